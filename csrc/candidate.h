// A (dist, id) candidate of the search (topk_l2.cpp) and of re-ranking (rerank_l2.cpp) as one
// 64-bit integer that sorts like the pair: the float's bits made to sort as unsigned integers,
// then the id. So ids must fit in 32 bits, and sorting candidates sends ties to the smaller id.
#pragma once
#include <cstdint>
#include <cstring>

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
