// See decontaminate.h.
#include "text/decontaminate.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <thread>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define EXAONE_TEXT_AVX2 1
#endif

namespace exaone_ext::text {

namespace {

inline uint64_t window_key(uint64_t h) { return fmix64(h) | 1; }  // never 0, the empty slot

// Decodes one UTF-8 code point at s[i]; returns its length, 0 when the bytes are not valid UTF-8
// (truncated, bad continuation, overlong, surrogate or above U+10FFFF).
inline int decode(const unsigned char* s, size_t i, size_t n, uint32_t& cp) {
  const unsigned c = s[i];
  if (c >= 0xC2 && c <= 0xDF) {
    if (i + 1 >= n || (s[i + 1] & 0xC0) != 0x80) return 0;
    cp = ((c & 0x1Fu) << 6) | (s[i + 1] & 0x3Fu);
    return 2;
  }
  if (c >= 0xE0 && c <= 0xEF) {
    if (i + 2 >= n || (s[i + 1] & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80) return 0;
    cp = ((c & 0x0Fu) << 12) | ((s[i + 1] & 0x3Fu) << 6) | (s[i + 2] & 0x3Fu);
    if (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return 3;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    if (i + 3 >= n || (s[i + 1] & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80 || (s[i + 3] & 0xC0) != 0x80)
      return 0;
    cp = ((c & 0x07u) << 18) | ((s[i + 1] & 0x3Fu) << 12) | ((s[i + 2] & 0x3Fu) << 6) | (s[i + 3] & 0x3Fu);
    if (cp < 0x10000 || cp > 0x10FFFF) return 0;
    return 4;
  }
  return 0;
}

inline uint64_t pow_u64(uint64_t b, int64_t e) {
  uint64_t r = 1;
  while (e-- > 0) r *= b;
  return r;
}

#if EXAONE_TEXT_AVX2
// For each 8-bit keep mask, the byte indices that gather the kept bytes of an 8-byte group to its front.
struct CompressTable {
  alignas(16) uint8_t idx[256][16];
  CompressTable() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int b = 0; b < 8; ++b)
        if (m & (1 << b)) idx[m][k++] = uint8_t(b);
      while (k < 16) idx[m][k++] = 0x80;  // pshufb writes 0
    }
  }
};
const CompressTable kCompress;

// The ASCII rule of str.isalnum / str.lower: keep [0-9A-Za-z], lower-case. Digits already have bit
// 0x20 set, so `byte | 0x20` is the output of every kept byte.
__attribute__((target("avx2,popcnt"))) size_t ascii_run_avx2(const unsigned char* s, size_t n, uint32_t*& out) {
  const __m256i lo_digit = _mm256_set1_epi8('0' - 1), hi_digit = _mm256_set1_epi8('9' + 1);
  const __m256i lo_alpha = _mm256_set1_epi8('a' - 1), hi_alpha = _mm256_set1_epi8('z' + 1);
  const __m256i case_bit = _mm256_set1_epi8(0x20);
  uint32_t* o = out;
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    if (_mm256_movemask_epi8(v) != 0) break;  // a byte >= 0x80: the caller decodes it
    const __m256i l = _mm256_or_si256(v, case_bit);
    const __m256i digit = _mm256_and_si256(_mm256_cmpgt_epi8(v, lo_digit), _mm256_cmpgt_epi8(hi_digit, v));
    const __m256i alpha = _mm256_and_si256(_mm256_cmpgt_epi8(l, lo_alpha), _mm256_cmpgt_epi8(hi_alpha, l));
    const uint32_t keep = uint32_t(_mm256_movemask_epi8(_mm256_or_si256(digit, alpha)));
    if (keep == 0) continue;
    const __m128i halves[2] = {_mm256_castsi256_si128(l), _mm256_extracti128_si256(l, 1)};
    for (int g = 0; g < 4; ++g) {
      const uint32_t m = (keep >> (8 * g)) & 0xFFu;
      const __m128i bytes = (g & 1) ? _mm_srli_si128(halves[g >> 1], 8) : halves[g >> 1];
      const __m128i packed =
          _mm_shuffle_epi8(bytes, _mm_load_si128(reinterpret_cast<const __m128i*>(kCompress.idx[m])));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm256_cvtepu8_epi32(packed));
      o += __builtin_popcount(m);
    }
  }
  out = o;
  return i;
}
#endif

}  // namespace

void Pool::FreeDeleter::operator()(uint64_t* p) const { std::free(p); }

uint64_t whole_key(const uint32_t* cps, int64_t n) {
  // four interleaved lanes: one multiply-add chain would bound the sampled mode at ~1 code point
  // per multiply latency
  uint64_t h[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int l = 0; l < 4; ++l) h[l] = h[l] * kHashBase + (uint64_t(cps[i + l]) + 1);
  for (int l = 0; i < n; ++i, ++l) h[l] = h[l] * kHashBase + (uint64_t(cps[i]) + 1);
  uint64_t x = uint64_t(n) * 0x9E3779B97F4A7C15ull;
  for (int l = 0; l < 4; ++l) x = fmix64(x ^ h[l]);
  return x | 1;
}

Normalizer::Normalizer(std::vector<uint32_t> table, std::vector<uint32_t> extra, bool allow_vector)
    : table_(std::move(table)), extra_(std::move(extra)) {
  if (table_.size() != kTableSize)
    throw std::invalid_argument("Normalizer: table must have 0x110000 entries, got " + std::to_string(table_.size()));
  for (size_t cp = 0; cp < table_.size(); ++cp) {
    const uint32_t v = table_[cp];
    if (v & kMultiFlag) {
      const size_t at = (v >> 8) & 0x7FFFFFu, len = v & 0xFFu;
      if (at + len > extra_.size())
        throw std::invalid_argument("Normalizer: multi-code-point entry " + std::to_string(cp) + " out of range");
    } else if (v >= kTableSize) {
      throw std::invalid_argument("Normalizer: entry " + std::to_string(cp) + " is not a code point");
    }
  }
  for (uint32_t c = 0; c < 128; ++c) ascii_[c] = table_[c];
  // output code points per input byte at most (a code point of k UTF-8 bytes gives 1, or len of its
  // multi-code-point lower case)
  for (size_t cp = 0x80; cp < table_.size(); ++cp) {
    const uint32_t v = table_[cp];
    if (!(v & kMultiFlag)) continue;
    const size_t bytes = cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
    max_per_byte_ = std::max(max_per_byte_, ((v & 0xFFu) + bytes - 1) / bytes);
  }
  for (uint32_t c = 0; c < 128; ++c)
    if (ascii_[c] & kMultiFlag) max_per_byte_ = std::max<size_t>(max_per_byte_, ascii_[c] & 0xFFu);
#if !EXAONE_TEXT_AVX2
  (void)allow_vector;
#else
  bool standard = true;
  for (uint32_t c = 0; c < 128; ++c) {
    const bool alnum = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
    standard = standard && ascii_[c] == (alnum ? (c | 0x20u) : 0u);
  }
  if (allow_vector && standard && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")) ascii_run_ = &ascii_run_avx2;
#endif
}

bool Normalizer::normalize(std::string_view sv, std::vector<uint32_t>& out) const {
  const size_t base = out.size();
  out.resize(base + capacity_for(sv.size()));
  size_t len = 0;
  const bool ok = normalize_into(sv, out.data() + base, len);
  out.resize(base + len);
  return ok;
}

bool Normalizer::normalize_into(std::string_view sv, uint32_t* out, size_t& len) const {
  const auto* s = reinterpret_cast<const unsigned char*>(sv.data());
  const size_t n = sv.size();
  uint32_t* o = out;
  size_t i = 0;
  size_t scalar_until = 0;  // after a vector block stopped on a non-ASCII byte: decode up to here
  while (i < n) {
    if (ascii_run_ != nullptr && i >= scalar_until && i + 32 <= n) {
      i += ascii_run_(s + i, n - i, o);
      scalar_until = i + 32;
      if (i >= n) break;
    }
    const unsigned c = s[i];
    uint32_t v;
    if (c < 0x80) {  // ASCII: a table in the object, no decoding
      v = ascii_[c];
      ++i;
    } else {
      uint32_t cp = 0;
      const int bytes = decode(s, i, n, cp);
      if (bytes == 0) {
        len = size_t(o - out);
        return false;
      }
      i += size_t(bytes);
      v = table_[cp];
    }
    if (!(v & kMultiFlag)) {
      *o = v;
      o += v != 0;  // branch-free: a dropped character is overwritten by the next one
    } else {
      const uint32_t* e = extra_.data() + ((v >> 8) & 0x7FFFFFu);
      for (uint32_t k = 0; k < (v & 0xFFu); ++k) *o++ = e[k];
    }
  }
  len = size_t(o - out);
  return true;
}

Pool::Pool(const Normalizer& norm, int64_t window, const std::vector<std::string_view>& tests,
           const std::vector<int32_t>& groups)
    : norm_(norm), window_(window), base_pow_(pow_u64(kHashBase, window)), groups_(groups) {
  if (window < 1) throw std::invalid_argument("Pool: window must be >= 1, got " + std::to_string(window));
  if (groups.size() != tests.size()) throw std::invalid_argument("Pool: one group per test example");
  if (tests.size() >= (size_t(1) << 32)) throw std::invalid_argument("Pool: at most 2^32 - 1 test examples");
  starts_.reserve(tests.size() + 1);
  starts_.push_back(0);
  int64_t windows = 0;
  for (size_t t = 0; t < tests.size(); ++t) {
    if (!norm_.normalize(tests[t], text_))
      throw std::invalid_argument("Pool: test example " + std::to_string(t) + " is not valid UTF-8");
    const int64_t len = int64_t(text_.size()) - starts_.back();
    if (len > int64_t(UINT32_MAX)) throw std::invalid_argument("Pool: test example " + std::to_string(t) + " too long");
    windows += std::max<int64_t>(0, len - window + 1);
    starts_.push_back(int64_t(text_.size()));
  }
  size_t slots = 16;
  while (slots < size_t(windows) * 2) slots <<= 1;  // load factor <= 1/2: short probe runs
  {
    constexpr size_t kHuge = size_t(1) << 21;
    const size_t bytes = (slots * sizeof(uint64_t) + kHuge - 1) / kHuge * kHuge;
    void* p = std::aligned_alloc(kHuge, bytes);
    if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, bytes, MADV_HUGEPAGE);  // advice only: without huge pages the table works the same
#endif
    std::memset(p, 0, bytes);
    keys_.reset(static_cast<uint64_t*>(p));
  }
  entries_.resize(slots);
  mask_ = slots - 1;
  shift_ = 64 - __builtin_ctzll(slots);

  for (size_t t = 0; t < tests.size(); ++t) {
    const uint32_t* cps = text_.data() + starts_[t];
    const int64_t len = starts_[t + 1] - starts_[t];
    if (len == 0) continue;
    if (len < window) {
      const uint64_t key = whole_key(cps, len);
      bool dup = false;
      for (auto [it, end] = short_.equal_range(key); it != end && !dup; ++it)
        dup = groups_[it->second] == groups_[t] && starts_[it->second + 1] - starts_[it->second] == len &&
              equal_window(cps, it->second, 0, len);
      if (!dup) short_.emplace(key, uint32_t(t));
      continue;
    }
    uint64_t h = 0;
    for (int64_t i = 0; i < len; ++i) {
      h = h * kHashBase + (uint64_t(cps[i]) + 1);
      if (i >= window) h -= (uint64_t(cps[i - window]) + 1) * base_pow_;
      if (i + 1 < window) continue;
      const int64_t off = i + 1 - window;
      const uint64_t key = window_key(h);
      size_t slot = size_t(key >> shift_);
      bool dup = false;
      while (keys_[slot] != 0) {
        const Entry& e = entries_[slot];
        if (keys_[slot] == key && groups_[e.test] == groups_[t] && equal_window(cps + off, e.test, e.offset, window)) {
          dup = true;
          break;
        }
        slot = (slot + 1) & mask_;
      }
      if (dup) continue;
      keys_[slot] = key;
      entries_[slot] = Entry{uint32_t(t), uint32_t(off)};
      ++num_windows_;
    }
  }
}

bool Pool::equal_window(const uint32_t* a, uint32_t test, uint32_t offset, int64_t len) const {
  return std::equal(a, a + len, text_.data() + starts_[test] + offset);
}

void Pool::probe(const uint32_t* win, uint64_t key, int64_t doc, int64_t offset, Scratch& s,
                 std::vector<Hit>& hits) const {
  size_t slot = size_t(key >> shift_);
  while (keys_[slot] != 0) {
    if (keys_[slot] == key) {
      const Entry& e = entries_[slot];
      const int32_t g = groups_[e.test];
      if (std::find(s.seen_groups.begin(), s.seen_groups.end(), g) == s.seen_groups.end() &&
          equal_window(win, e.test, e.offset, window_)) {
        s.seen_groups.push_back(g);
        hits.push_back(Hit{doc, int64_t(e.test), offset});
      }
    }
    slot = (slot + 1) & mask_;
  }
}

void Pool::check_one(std::string_view doc, int64_t index, Mode mode, int64_t samples, Scratch& s,
                     std::vector<Hit>& hits, bool& ok) const {
  s.seen_groups.clear();
  const size_t cap = norm_.capacity_for(doc.size());
  if (s.cap < cap) {
    s.cap = std::max(cap, 2 * s.cap);
    s.cps.reset(new uint32_t[s.cap]);  // no zero fill: only written code points are read
  }
  size_t n_cps = 0;
  ok = norm_.normalize_into(doc, s.cps.get(), n_cps);
  if (!ok) return;
  const int64_t len = int64_t(n_cps);
  const uint32_t* cps = s.cps.get();
  if (len == 0) return;
  if (len < window_) {  // compared whole, against the whole texts of the short test examples
    const uint64_t key = whole_key(cps, len);
    for (auto [it, end] = short_.equal_range(key); it != end; ++it) {
      const uint32_t t = it->second;
      const int32_t g = groups_[t];
      if (starts_[t + 1] - starts_[t] == len && equal_window(cps, t, 0, len) &&
          std::find(s.seen_groups.begin(), s.seen_groups.end(), g) == s.seen_groups.end()) {
        s.seen_groups.push_back(g);
        hits.push_back(Hit{index, int64_t(t), 0});
      }
    }
    return;
  }
  const int64_t n_windows = len - window_ + 1;
  if (mode == Mode::kSampled && samples < n_windows) {
    // Windows drawn in batches: their hash chains interleave, and every slot of a batch is on its way
    // from memory before the first is read (one miss per document instead of one per window).
    constexpr int64_t kBatch = 16;
    uint64_t state = whole_key(cps, len);  // seeded from the content: same document, same windows
    for (int64_t k0 = 0; k0 < samples; k0 += kBatch) {
      const int64_t m = std::min(kBatch, samples - k0);
      int64_t off[kBatch];
      uint64_t key[kBatch];
      for (int64_t k = 0; k < m; ++k) {
        off[k] = int64_t(splitmix64(state) % uint64_t(n_windows));
        key[k] = 0;
      }
      for (int64_t i = 0; i < window_; ++i)
        for (int64_t k = 0; k < m; ++k) key[k] = key[k] * kHashBase + (uint64_t(cps[off[k] + i]) + 1);
      for (int64_t k = 0; k < m; ++k) {
        key[k] = window_key(key[k]);
        __builtin_prefetch(&keys_[key[k] >> shift_]);
      }
      for (int64_t k = 0; k < m; ++k) probe(cps + off[k], key[k], index, off[k], s, hits);
    }
    return;
  }
  // Every window: keys first, then look-ups with the slot of a key kPrefetch ahead already on its way
  // from memory (the table is far larger than the caches; one miss per window would bound the rate).
  constexpr int64_t kPrefetch = 16;
  s.keys.resize(size_t(n_windows));
  uint64_t h = 0;
  for (int64_t i = 0; i < len; ++i) {
    h = h * kHashBase + (uint64_t(cps[i]) + 1);
    if (i >= window_) h -= (uint64_t(cps[i - window_]) + 1) * base_pow_;
    if (i + 1 >= window_) s.keys[size_t(i + 1 - window_)] = window_key(h);
  }
  const uint64_t* keys = s.keys.data();
  for (int64_t i = 0; i < std::min(kPrefetch, n_windows); ++i) __builtin_prefetch(&keys_[keys[i] >> shift_]);
  for (int64_t i = 0; i < n_windows; ++i) {
    if (i + kPrefetch < n_windows) __builtin_prefetch(&keys_[keys[i + kPrefetch] >> shift_]);
    const uint64_t key = keys[i];
    size_t slot = size_t(key >> shift_);
    uint64_t k = keys_[slot];
    if (k == 0) continue;  // the common case: an empty slot, no match
    if (k != key) {        // walk the run only when it may hold the key
      do {
        slot = (slot + 1) & mask_;
        k = keys_[slot];
      } while (k != 0 && k != key);
      if (k == 0) continue;
    }
    probe(cps + i, key, index, i, s, hits);
  }
}

void Pool::check(const std::vector<std::string_view>& docs, Mode mode, int64_t samples, int threads,
                 std::vector<Hit>& hits, std::vector<int64_t>& invalid) const {
  if (samples < 1 && mode == Mode::kSampled)
    throw std::invalid_argument("Pool::check: samples must be >= 1, got " + std::to_string(samples));
  const int64_t n = int64_t(docs.size());
  threads = std::max(1, std::min<int>(threads, int((n + 63) / 64)));
  std::vector<std::vector<Hit>> part_hits(static_cast<size_t>(threads));
  std::vector<std::vector<int64_t>> part_invalid(static_cast<size_t>(threads));
  std::atomic<int64_t> next{0};
  constexpr int64_t kGrain = 64;  // documents per claim: small enough to balance uneven lengths
  auto work = [&](int w) {
    Scratch s;
    while (true) {
      const int64_t begin = next.fetch_add(kGrain);
      if (begin >= n) break;
      for (int64_t d = begin; d < std::min(n, begin + kGrain); ++d) {
        bool ok = true;
        check_one(docs[size_t(d)], d, mode, samples, s, part_hits[size_t(w)], ok);
        if (!ok) part_invalid[size_t(w)].push_back(d);
      }
    }
  };
  if (threads == 1) {
    work(0);
  } else {
    std::vector<std::thread> pool;
    for (int w = 0; w < threads; ++w) pool.emplace_back(work, w);
    for (auto& t : pool) t.join();
  }
  for (auto& p : part_hits) hits.insert(hits.end(), p.begin(), p.end());
  for (auto& p : part_invalid) invalid.insert(invalid.end(), p.begin(), p.end());
  // Which thread took which document varies; the order of the results does not.
  std::sort(hits.begin(), hits.end(), [&](const Hit& a, const Hit& b) {
    if (a.doc != b.doc) return a.doc < b.doc;
    return groups_[a.test] < groups_[b.test];
  });
  std::sort(invalid.begin(), invalid.end());
}

}  // namespace exaone_ext::text
