// Substring-overlap decontamination, torch-free: normalise text (Unicode-aware: keep alphanumeric
// code points, lower-cased), hash every window of `window` code points of the test examples into a
// pool, and look windows of training documents up in it, in parallel over documents.
//
// Normalisation is table driven and the table comes from the caller (Python builds it from
// str.isalnum / str.lower), so both sides agree by construction:
//   table[cp] == 0            the code point is dropped
//   table[cp] & kMultiFlag    kept, lower-cases to extra[(v >> 8) & 0x7fffff] .. + (v & 0xff) code points
//   otherwise                 kept, lower-cases to the single code point table[cp]
//
// Hashes: polynomial over code points, h = sum (c_i + 1) * B^(n-1-i) mod 2^64, rolled one code point
// at a time, then mixed (murmur3 fmix64) into a table key. Every key hit is verified against the
// stored normalised test text, so a collision can never mark a clean document.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace exaone_ext::text {

constexpr uint32_t kMultiFlag = 0x80000000u;
constexpr uint32_t kTableSize = 0x110000u;
constexpr uint64_t kHashBase = 0xd6e8feb86659fd93ull;  // odd: the powers never vanish mod 2^64

inline uint64_t fmix64(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdull;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ull;
  k ^= k >> 33;
  return k;
}

// splitmix64: the sampler's generator (the Python reference implements the same one).
inline uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

class Normalizer {
 public:
  // allow_vector = false keeps every byte on the table path (the oracle for the vector path in tests).
  Normalizer(std::vector<uint32_t> table, std::vector<uint32_t> extra, bool allow_vector = true);
  // Appends the normalised code points of UTF-8 `s` to `out`; returns false on invalid UTF-8
  // (what was decoded up to there stays in `out`).
  bool normalize(std::string_view s, std::vector<uint32_t>& out) const;
  // The same into out[0 .. capacity_for(s.size())); len: code points written.
  bool normalize_into(std::string_view s, uint32_t* out, size_t& len) const;
  // Room normalize_into needs: the vector path stores 8 code points at a time past the last one kept.
  size_t capacity_for(size_t nbytes) const { return nbytes * max_per_byte_ + kSlack; }
  // Whether runs of ASCII go through the vector path (AVX2 CPU, and the table keeps exactly
  // [0-9A-Za-z], lower-cased, as str.isalnum / str.lower do).
  bool vectorized() const { return ascii_run_ != nullptr; }

  static constexpr size_t kSlack = 8;
  // Normalises whole 32-byte blocks of s[0 .. n) while they are all ASCII; returns the bytes consumed
  // and advances out.
  using AsciiRun = size_t (*)(const unsigned char* s, size_t n, uint32_t*& out);

 private:
  std::vector<uint32_t> table_, extra_;
  uint32_t ascii_[128];
  size_t max_per_byte_ = 1;
  AsciiRun ascii_run_ = nullptr;
};

struct Hit {
  int64_t doc;        // training document (index in the batch)
  int64_t test;       // test example whose text holds the window
  int64_t offset;     // window start in the document's normalised text (0 for whole-text matches)
};

enum class Mode { kExhaustive, kSampled };

class Pool {
 public:
  // tests: UTF-8 test examples; groups[i]: the benchmark of test i (hits are reported once per
  // (document, benchmark)). Windows equal in text and benchmark are stored once.
  Pool(const Normalizer& norm, int64_t window, const std::vector<std::string_view>& tests,
       const std::vector<int32_t>& groups);

  // Checks docs[0..n) with `threads` threads. Fills `hits` (sorted by doc, then benchmark) and
  // `invalid` (documents that are not valid UTF-8). Results do not depend on `threads`.
  void check(const std::vector<std::string_view>& docs, Mode mode, int64_t samples, int threads,
             std::vector<Hit>& hits, std::vector<int64_t>& invalid) const;

  int64_t window() const { return window_; }
  int64_t num_windows() const { return num_windows_; }
  int64_t num_short() const { return int64_t(short_.size()); }
  int64_t table_bytes() const { return int64_t(entries_.size() * (sizeof(uint64_t) + sizeof(Entry))); }
  int64_t num_tests() const { return int64_t(starts_.size()) - 1; }

 private:
  struct Entry {
    uint32_t test, offset;
  };
  // The slot array: 2 MiB aligned and marked for transparent huge pages where the OS has them (a
  // look-up is a random access into tens of MiB; with 4 KiB pages nearly every one also misses the TLB).
  struct FreeDeleter {
    void operator()(uint64_t* p) const;
  };
  struct Scratch {
    std::unique_ptr<uint32_t[]> cps;
    size_t cap = 0;
    std::vector<uint64_t> keys;
    std::vector<int32_t> seen_groups;
  };
  void check_one(std::string_view doc, int64_t index, Mode mode, int64_t samples, Scratch& s,
                 std::vector<Hit>& hits, bool& ok) const;
  void probe(const uint32_t* win, uint64_t key, int64_t doc, int64_t offset, Scratch& s,
             std::vector<Hit>& hits) const;
  bool equal_window(const uint32_t* a, uint32_t test, uint32_t offset, int64_t len) const;

  const Normalizer& norm_;
  int64_t window_;
  uint64_t base_pow_;                  // B^window, removes the code point leaving a window
  std::vector<uint32_t> text_;         // normalised test texts, back to back
  std::vector<int64_t> starts_;        // test i: text_[starts_[i] .. starts_[i + 1])
  std::vector<int32_t> groups_;
  std::unique_ptr<uint64_t[], FreeDeleter> keys_;  // open addressing, linear probing, 0 = empty
  std::vector<Entry> entries_;
  uint64_t mask_ = 0;
  int shift_ = 64;
  int64_t num_windows_ = 0;
  std::unordered_multimap<uint64_t, uint32_t> short_;  // whole-text keys of tests shorter than window
};

// Whole-text key of normalised code points: the polynomial hash over four interleaved lanes (code
// points i, i+4, ... in lane i % 4), each folded in with fmix64. The sampler's seed, and the key of
// texts shorter than the window.
uint64_t whole_key(const uint32_t* cps, int64_t n);

}  // namespace exaone_ext::text
