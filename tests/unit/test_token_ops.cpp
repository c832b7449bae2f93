// kernels/token_ops.h's speculative-scrub copies on the host: EntrySpans against the MODEL1 packer,
// the contracts (ContractError naming the argument), and a round trip backup -> overwrite -> scrub that
// restores exactly the named items and nothing else.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "engine/core/error.h"
#include "kernels/norm_rope.h"
#include "kernels/token_ops.h"

namespace dsv4::kernels {
namespace {

Tensor random_u8(const Shape& shape, std::mt19937& rng, const std::string& name) {
  Tensor t = Tensor::empty(shape, DType::u8, name);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<uint8_t>()[i] = static_cast<uint8_t>(rng());
  return t;
}

Tensor random_f32(const Shape& shape, std::mt19937& rng, const std::string& name) {
  Tensor t = Tensor::empty(shape, DType::f32, name);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = n(rng);
  return t;
}

Tensor words(const std::vector<int64_t>& w, int64_t capacity = 0) {
  const int64_t n = std::max<int64_t>(static_cast<int64_t>(w.size()), capacity);
  Tensor t = Tensor::empty({n}, DType::i64, "words");
  for (int64_t i = 0; i < n; ++i) t.data<int64_t>()[i] = i < static_cast<int64_t>(w.size()) ? w[static_cast<size_t>(i)] : -7;
  return t;
}

std::vector<uint8_t> bytes(const Tensor& t) {
  const auto* p = static_cast<const uint8_t*>(t.data_ptr());
  return std::vector<uint8_t>(p, p + dtype_storage_bytes(t.dtype(), t.numel()));
}

void expect_contract(const std::function<void()>& f, const std::string& argument) {
  try {
    f();
    ADD_FAILURE() << "no ContractError (expected one naming '" << argument << "')";
  } catch (const ContractError& e) {
    EXPECT_EQ(e.argument(), argument) << e.what();
  }
}

const Model1Layout kLayout = model1_layout("test", 64, 16, 16);
constexpr int64_t kPageEntries = 4;

TEST(TokenOpsScrub, Model1SpansAreWhereThePackerWrites) {
  const EntrySpans s = entry_spans(false, 64, kLayout, kPageEntries);
  EXPECT_EQ(s.entry_bytes(), kLayout.value_bytes() + kLayout.scale_bytes());
  EXPECT_EQ(s.capacity(3 * kLayout.page_bytes(kPageEntries) + 5), 3 * kPageEntries);
  std::mt19937 rng(1);
  std::vector<float> kv(64);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (float& x : kv) x = n(rng);
  const int64_t page_bytes = kLayout.page_bytes(kPageEntries);
  for (int64_t loc : {0, 1, 3, 4, 6, 11}) {
    // Bytes 0xAB everywhere but the entry's spans: packing writes exactly the spans.
    std::vector<uint8_t> cache(static_cast<size_t>(3 * page_bytes), 0xAB), marked = cache;
    model1_pack(kLayout, kPageEntries, kv.data(), cache.data(), loc);
    for (int part = 0; part < 2; ++part) {
      const ByteSpan b = s.span(loc, part);
      for (int64_t i = 0; i < b.bytes; ++i) marked[static_cast<size_t>(b.offset + i)] = cache[static_cast<size_t>(b.offset + i)];
    }
    EXPECT_EQ(cache, marked) << "loc " << loc;
    std::vector<uint8_t> values(static_cast<size_t>(kLayout.value_bytes())), scales(static_cast<size_t>(kLayout.scale_bytes()));
    model1_pack_entry(kLayout, kv.data(), values.data(), scales.data());
    EXPECT_EQ(0, std::memcmp(cache.data() + s.span(loc, 0).offset, values.data(), values.size()));
    EXPECT_EQ(0, std::memcmp(cache.data() + s.span(loc, 1).offset, scales.data(), scales.size()));
  }
  const EntrySpans f = entry_spans(true, 8, kLayout, kPageEntries);
  EXPECT_EQ(f.entry_bytes(), 32);
  EXPECT_EQ(f.span(5, 0).offset, 160);
  EXPECT_EQ(f.span(5, 1).bytes, 0);
}

TEST(TokenOpsScrub, ContractsNameTheArgument) {
  std::mt19937 rng(2);
  const EntrySpans spans = entry_spans(false, 64, kLayout, kPageEntries);
  const int64_t W = 24, N = 10, C = 4, pages = 3;
  Tensor state = random_u8({N, W}, rng, "state"), saved = random_u8({C, W}, rng, "saved");
  Tensor cache = random_u8({pages, kLayout.page_bytes(kPageEntries)}, rng, "cache");
  Tensor saved_e = random_u8({C, spans.entry_bytes()}, rng, "saved_entries");
  const Tensor ok = words({1, 5, 2, 3, 9});

  // backup_state_rows
  backup_state_rows(state, ok, saved);
  expect_contract([&] { backup_state_rows(random_f32({N, W / 4}, rng, "s"), ok, saved); }, "state");
  expect_contract([&] { Tensor bad = random_u8({C, W + 1}, rng, "s"); backup_state_rows(state, ok, bad); }, "saved");
  expect_contract([&] { backup_state_rows(state, Tensor::empty({5}, DType::i32, "w"), saved); }, "words");
  expect_contract([&] { backup_state_rows(state, words({0}), saved); }, "words");
  expect_contract([&] { backup_state_rows(state, words({-1, 0}), saved); }, "words");          // E < 0
  expect_contract([&] { backup_state_rows(state, words({3, 0, 0}), saved); }, "words");        // E past the words
  expect_contract([&] { backup_state_rows(state, words({0, 5, 1, 1, 1, 1, 1}), saved); }, "words");  // S > C
  expect_contract([&] { backup_state_rows(state, words({0, 2, 1}), saved); }, "words");        // S past the words
  expect_contract([&] { backup_state_rows(state, words({0, 1, N}), saved); }, "words");        // row >= N
  expect_contract([&] { backup_state_rows(state, words({0, 1, -1}), saved); }, "words");       // row < 0

  // backup_entries
  backup_entries(cache, ok, spans, saved_e);
  expect_contract([&] { Tensor bad = random_u8({C, spans.entry_bytes() - 1}, rng, "e"); backup_entries(cache, ok, spans, bad); },
                  "saved");
  expect_contract([&] { backup_entries(cache.narrow(1, 0, 8), ok, spans, saved_e); }, "cache");
  expect_contract([&] { backup_entries(Tensor::empty({64}, DType::f4_e2m1, "c"), ok, spans, saved_e); }, "cache");
  expect_contract([&] { backup_entries(cache, words({C + 1, 0, 0, 0, 0, 0, 0}), spans, saved_e); }, "words");  // E > C
  expect_contract([&] { backup_entries(cache, words({2, 0}), spans, saved_e); }, "words");  // E past the words
  expect_contract([&] { backup_entries(cache, words({1, pages * kPageEntries, 0}), spans, saved_e); }, "words");
  EntrySpans bad_spans = spans;
  bad_spans.page_bytes = kPageEntries * spans.entry_bytes() - 1;
  expect_contract([&] { backup_entries(cache, ok, bad_spans, saved_e); }, "spans");
  bad_spans = entry_spans(true, 0, kLayout, kPageEntries);
  expect_contract([&] { backup_entries(cache, ok, bad_spans, saved_e); }, "spans");

  // scrub_restore
  const Tensor sw = words({1, 0, 5, 1, 3, 9});
  scrub_restore(saved_e, saved, sw, spans, cache, state);
  expect_contract([&] { Tensor bad = random_u8({C, 3}, rng, "e"); scrub_restore(bad, saved, sw, spans, cache, state); },
                  "saved_entries");
  expect_contract([&] { Tensor bad = random_u8({C, W - 1}, rng, "r"); scrub_restore(saved_e, bad, sw, spans, cache, state); },
                  "saved_rows");
  expect_contract([&] { Tensor st = random_f32({N, W}, rng, "st"); scrub_restore(saved_e, saved, sw, spans, cache, st); },
                  "state");
  expect_contract([&] { scrub_restore(saved_e, saved, words({0}), spans, cache, state); }, "words");
  expect_contract([&] { scrub_restore(saved_e, saved, words({1, C, 5, 0}), spans, cache, state); }, "words");  // entry slot
  expect_contract([&] { scrub_restore(saved_e, saved, words({1, 0, -1, 0}), spans, cache, state); }, "words");  // entry
  expect_contract([&] { scrub_restore(saved_e, saved, words({0, 1, C, 0}), spans, cache, state); }, "words");  // row slot
  expect_contract([&] { scrub_restore(saved_e, saved, words({0, 1, 0, N}), spans, cache, state); }, "words");  // row
  expect_contract([&] { scrub_restore(saved_e, saved, words({0, 1, 0}), spans, cache, state); }, "words");  // S past the words
  expect_contract([&] { scrub_restore(saved_e, saved, words({C + 1, 0, 0}, 40), spans, cache, state); }, "words");  // E > Ce
}

// The engine's sequence: back up the items a verify batch's drafts will overwrite, overwrite them,
// then restore the rejected ones: those get their old bytes back, the accepted keep the new ones, and
// nothing else changes.
void round_trip(bool indexer) {
  std::mt19937 rng(indexer ? 4 : 3);
  const int64_t dims = 16, W = 40, N = 12, C = 6, pages = 3;
  const EntrySpans spans = entry_spans(indexer, dims, kLayout, kPageEntries);
  Tensor cache = indexer ? random_f32({pages, kPageEntries, dims}, rng, "cache")
                         : random_u8({pages, kLayout.page_bytes(kPageEntries)}, rng, "cache");
  Tensor state = random_u8({N, W}, rng, "state");
  const int64_t entries = spans.capacity(dtype_storage_bytes(cache.dtype(), cache.numel()));
  ASSERT_EQ(entries, pages * kPageEntries);
  const std::vector<int64_t> dest = {0, 5, 11, 6, 3}, rows = {2, 11, 7, 0};
  std::vector<int64_t> w = {static_cast<int64_t>(dest.size())};
  w.insert(w.end(), dest.begin(), dest.end());
  w.push_back(static_cast<int64_t>(rows.size()));
  w.insert(w.end(), rows.begin(), rows.end());
  const Tensor backup_words = words(w, 2 + 4 * C);
  Tensor saved_e = random_u8({C, spans.entry_bytes()}, rng, "saved_entries"), saved_r = random_u8({C, W}, rng, "saved_rows");
  const std::vector<uint8_t> unused_e = bytes(saved_e), unused_r = bytes(saved_r);
  backup_state_rows(state, backup_words, saved_r);
  backup_entries(cache, backup_words, spans, saved_e);

  const std::vector<uint8_t> cache0 = bytes(cache), state0 = bytes(state);
  auto entry_bytes = [&](const std::vector<uint8_t>& c, int64_t loc) {
    std::vector<uint8_t> out;
    for (int part = 0; part < 2; ++part) {
      const ByteSpan b = spans.span(loc, part);
      out.insert(out.end(), c.begin() + b.offset, c.begin() + b.offset + b.bytes);
    }
    return out;
  };
  // The saved rows are the named items' bytes; the slots past the counts are untouched.
  const int64_t eb = spans.entry_bytes();
  for (size_t j = 0; j < dest.size(); ++j) {
    const std::vector<uint8_t> got(saved_e.data<uint8_t>() + j * eb, saved_e.data<uint8_t>() + (j + 1) * eb);
    EXPECT_EQ(got, entry_bytes(cache0, dest[j])) << "entry " << j;
  }
  for (size_t j = 0; j < rows.size(); ++j) {
    EXPECT_EQ(0, std::memcmp(saved_r.data<uint8_t>() + j * W, state0.data() + rows[j] * W, static_cast<size_t>(W)));
  }
  EXPECT_EQ(0, std::memcmp(saved_e.data<uint8_t>() + dest.size() * eb, unused_e.data() + dest.size() * eb,
                           static_cast<size_t>((C - static_cast<int64_t>(dest.size())) * eb)));
  EXPECT_EQ(0, std::memcmp(saved_r.data<uint8_t>() + rows.size() * W, unused_r.data() + rows.size() * W,
                           static_cast<size_t>((C - static_cast<int64_t>(rows.size())) * W)));

  // The drafts write every named item.
  auto* c = static_cast<uint8_t*>(cache.data_ptr());
  for (int64_t loc : dest) {
    for (int part = 0; part < 2; ++part) {
      const ByteSpan b = spans.span(loc, part);
      for (int64_t i = 0; i < b.bytes; ++i) c[b.offset + i] = static_cast<uint8_t>(rng());
    }
  }
  for (int64_t r : rows) {
    for (int64_t i = 0; i < W; ++i) state.data<uint8_t>()[r * W + i] = static_cast<uint8_t>(rng());
  }
  const std::vector<uint8_t> cache1 = bytes(cache), state1 = bytes(state);

  // Rejected: entries 1 and 3 (dest 5 and 6), rows 0 and 2 (rows 2 and 7), as (slot, dest) pairs.
  const Tensor scrub_words = words({2, 1, 5, 3, 6, 2, 0, 2, 2, 7}, 2 + 4 * C);
  scrub_restore(saved_e, saved_r, scrub_words, spans, cache, state);
  std::vector<uint8_t> want_cache = cache1, want_state = state1;
  for (int64_t loc : {5, 6}) {
    for (int part = 0; part < 2; ++part) {
      const ByteSpan b = spans.span(loc, part);
      std::memcpy(want_cache.data() + b.offset, cache0.data() + b.offset, static_cast<size_t>(b.bytes));
    }
  }
  for (int64_t r : {2, 7}) std::memcpy(want_state.data() + r * W, state0.data() + r * W, static_cast<size_t>(W));
  EXPECT_EQ(bytes(cache), want_cache);
  EXPECT_EQ(bytes(state), want_state);
  // Every item rejected: the caches are what they were before the drafts.
  scrub_restore(saved_e, saved_r, words({5, 0, 0, 1, 5, 2, 11, 3, 6, 4, 3, 4, 0, 2, 1, 11, 2, 7, 3, 0}), spans, cache,
                state);
  EXPECT_EQ(bytes(cache), cache0);
  EXPECT_EQ(bytes(state), state0);
  // Nothing rejected: nothing changes.
  scrub_restore(saved_e, saved_r, words({0, 0}, 2 + 4 * C), spans, cache, state);
  EXPECT_EQ(bytes(cache), cache0);
  EXPECT_EQ(bytes(state), state0);
}

TEST(TokenOpsScrub, RoundTripModel1Entries) { round_trip(false); }
TEST(TokenOpsScrub, RoundTripIndexerKeys) { round_trip(true); }

}  // namespace
}  // namespace dsv4::kernels
