"""
Manifests: what a datastore is (the Manifest dataclass, meta.json), written once by its build
and checked by every reader, with its files' sizes and checksums and a seal over its fields.
"""
import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields

from tqdm import tqdm

from knnlm import KnnlmError
from knnlm_tools.files import read_json, write_json
from knnlm_tools.checkpoints import fingerprint, vocab_fingerprint


@dataclass
class Manifest:
    """Everything a datastore depends on. A rerun of the build with the same manifest resumes or
    reuses it; anything else is refused. meta.json adds the size and checksums of the files and a
    seal (a checksum of all its fields: a hand-edited manifest no longer matches it)."""
    count: int
    dim: int
    key_dtype: str
    key_type: str
    model_fingerprint: str
    vocab_fingerprint: str
    vocab_size: int
    min_context: int
    block_size: int
    source: dict = None  # the corpus file: its path, split and sha256 (None for made-up keys)
    precision: str = "float32"  # of the forward pass that computed the keys: float32 or bfloat16 (autocast)

    @classmethod
    def of(cls, model, vocab, n, key_type, min_context, source, precision="float32"):
        return cls(n, model.cfg.d_model, "float16", key_type, fingerprint(model, vocab), vocab_fingerprint(vocab),
                   len(vocab), min_context, model.cfg.block_size, source, precision)

    @classmethod
    def read(cls, path):
        """-> (the manifest in path/meta.json, the checksums of its files, its seal), its fields' types and seal checked."""
        meta = read_json(os.path.join(path, "meta.json"), {})
        written = {**WRITTEN_BEFORE, **meta}  # a datastore built before a field was added has its value
        for name, kind, optional in [(f.name, f.type, f.default is None) for f in fields(cls)] + [
                ("files", dict, False), ("seal", str, False)]:
            value = written.get(name)
            if not (isinstance(value, kind) and not isinstance(value, bool) or optional and value is None):
                raise KnnlmError(f"{path}/meta.json is not what it should be: field {name!r} is {value!r}")
        if seal(meta) != meta["seal"]:
            raise KnnlmError(f"{path}/meta.json was edited: its fields no longer match their seal. Rebuild the "
                             "datastore rather than edit its manifest")
        return cls(**{f.name: written[f.name] for f in fields(cls)}), meta["files"], meta["seal"]

    def write(self, path, progress=False):
        """Finish a datastore: meta.json, with the checksums of its files and its seal."""
        meta = {**asdict(self), "files": {name: file_checksums(os.path.join(path, name), progress)
                                          for name in DATASTORE_FILES}}
        write_json({**meta, "seal": seal(meta)}, os.path.join(path, "meta.json"))


WRITTEN_BEFORE = {"precision": "float32"}  # fields added since the first datastores, as those were built
DATASTORE_FILES = ("keys.npy", "vals.npy")
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 64, 4096


def file_checksums(path, progress=False):
    """{bytes, sample (sha256 of 64 blocks spread over the file: cheap, checked at every load),
    sha256 (of the whole file: checked on request, --verify)}."""
    return {"bytes": os.path.getsize(path), "sample": sampled_sha256(path), "sha256": sha256_of(path, progress)}


def sampled_sha256(path):
    size, h = os.path.getsize(path), hashlib.sha256()
    with open(path, "rb") as f:
        for i in range(SAMPLE_BLOCKS):
            h.update(os.pread(f.fileno(), SAMPLE_BLOCK_BYTES, max(0, size - SAMPLE_BLOCK_BYTES) * i // (SAMPLE_BLOCKS - 1)))
    return h.hexdigest()[:16]


def sha256_of(path, progress=False, chunk=1 << 24):
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True,
                                      desc=f"sha256 {os.path.basename(path)}", disable=not progress) as bar:
        while block := f.read(chunk):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()[:16]


def seal(meta):
    """A checksum of a manifest's own fields: a meta.json edited by hand no longer matches it."""
    return hashlib.sha256(json.dumps({f: v for f, v in meta.items() if f != "seal"}, sort_keys=True).encode()).hexdigest()[:16]


def check_files(directory, files, full=False):
    """Each file is the one the manifest vouches for: its size and sampled checksum (full: its sha256)."""
    for name, want in files.items():
        path = os.path.join(directory, name)
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if not isinstance(want, dict) or size != want.get("bytes"):
            raise KnnlmError(f"{path} has {size} bytes where its manifest vouches for {want.get('bytes') if isinstance(want, dict) else want}: "
                             "truncated, or not this datastore's file")
        if sampled_sha256(path) != want.get("sample") or (full and sha256_of(path, progress=True) != want.get("sha256")):
            raise KnnlmError(f"{path} is not the file its manifest vouches for (its checksum differs): a file of "
                             "another datastore? Rebuild it")
