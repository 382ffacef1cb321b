// A (dist, id) candidate of the search (topk_l2.cpp) and of re-ranking (rerank_l2.cpp) as one
// 64-bit integer that sorts like the pair: the float's bits made to sort as unsigned integers,
// then the id. So ids must fit in 32 bits, and sorting candidates sends ties to the smaller id.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

inline uint64_t candidate(float dist, int64_t id) {
  uint32_t bits;
  dist += 0.0f;  // -0 -> +0: the two compare equal as floats, so they must here
  std::memcpy(&bits, &dist, sizeof bits);
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (uint64_t(bits) << 32) | uint64_t(id);
}

inline float candidate_dist(uint64_t c) {
  uint32_t bits = uint32_t(c >> 32);
  bits = (bits & 0x80000000u) ? (bits & 0x7fffffffu) : ~bits;
  float dist;
  std::memcpy(&dist, &bits, sizeof dist);
  return dist;
}

inline int64_t candidate_id(uint64_t c) { return int64_t(c & 0xffffffffu); }

// Sorts candidates c[0, n) ascending, as std::sort would (they are distinct integers), with
// spare as scratch: a radix sort, least significant byte first, that skips the bytes all of
// them share (an id's high bytes, most often a distance's exponent). Faster than std::sort on the
// main job's 1024 (bench/results/rerank_sort.md); below 256 candidates std::sort is used.
inline void sort_candidates(uint64_t* c, int64_t n, std::vector<uint64_t>& spare) {
  if (n < 256) {
    std::sort(c, c + n);
    return;
  }
  uint32_t count[8][256] = {};  // count[p][v]: candidates whose byte p is v
  for (int64_t i = 0; i < n; ++i)
    for (int p = 0; p < 8; ++p) ++count[p][(c[i] >> (8 * p)) & 0xff];
  spare.resize(n);
  uint64_t *from = c, *to = spare.data();
  for (int p = 0; p < 8; ++p) {
    const int shift = 8 * p;
    if (count[p][(from[0] >> shift) & 0xff] == uint64_t(n)) continue;  // one value: nothing to move
    uint32_t next[256];  // where the next candidate with each byte value goes
    for (uint32_t v = 0, sum = 0; v < 256; sum += count[p][v++]) next[v] = sum;
    for (int64_t i = 0; i < n; ++i) to[next[(from[i] >> shift) & 0xff]++] = from[i];
    std::swap(from, to);
  }
  if (from != c) std::memcpy(c, from, n * sizeof(uint64_t));
}
