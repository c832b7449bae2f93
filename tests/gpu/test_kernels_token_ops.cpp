// kernels/token_ops.h on the GPU (label gpu; skipped without one): each op on device tensors equals
// the same op on host tensors, bit for bit, over T in {0, 1, 2, odd, bucket sizes}; prefill CP's
// copy_rows and unshard_rows (2 and 4 ranks) among them.
#include <algorithm>
#include <cstring>
#include <limits>
#include <random>
#include <tuple>
#include <utility>
#include <vector>

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "tests/gpu/gpu_test.h"

#include "engine/core/allocator.h"
#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "engine/runtime/backend.h"
#include "kernels/token_ops.h"

namespace dsv4::kernels {
namespace {

constexpr int64_t kTokenCounts[] = {0, 1, 2, 7, 8, 64};

Allocator& device() {
  static Allocator a(*cuda_memory(0), AllocatorMode::testing);
  return a;
}

Tensor random_bf16(const Shape& shape, std::mt19937& rng) {
  Tensor t = Tensor::empty(shape, DType::bf16, "x");
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<uint16_t>()[i] = f32_to_bf16(n(rng));
  return t;
}

Tensor ints(const std::vector<int32_t>& v) {
  Tensor t = Tensor::empty({static_cast<int64_t>(v.size())}, DType::i32, "ids");
  if (!v.empty()) std::memcpy(t.data_ptr(), v.data(), v.size() * 4);
  return t;
}

// The bytes of a tensor's (contiguous) elements, wherever it lives.
std::vector<uint8_t> bytes_of(const Tensor& t) {
  const Tensor h = t.contiguous().to(default_host_allocator());
  const auto* p = static_cast<const uint8_t*>(h.data_ptr());
  return std::vector<uint8_t>(p, p + dtype_storage_bytes(h.dtype(), h.numel()));
}

Tensor on_gpu(const Tensor& t) { return t.to(device()); }
Tensor empty_gpu(const Shape& s, DType d) { return Tensor::empty(s, d, device(), "out"); }

void sync() { ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess); }

TEST(TokenOpsGpu, EmbedGatherArgmaxAddAndScaleEqualTheHost) {
  DSV4_REQUIRE_GPU();
  std::mt19937 rng(11);
  const int64_t V = 97, d = 24, copies = 3;
  const Tensor table = random_bf16({V, d}, rng);
  for (int64_t T : kTokenCounts) {
    std::vector<int32_t> id(static_cast<size_t>(T));
    for (auto& x : id) x = static_cast<int32_t>(rng() % V);
    const Tensor ids = ints(id);
    Tensor host_out = Tensor::empty({T, copies * d}, DType::bf16, "out");
    embed_rows(ids, table, copies, host_out);
    Tensor gpu_out = empty_gpu({T, copies * d}, DType::bf16);
    embed_rows(on_gpu(ids), on_gpu(table), copies, gpu_out);
    sync();
    EXPECT_EQ(bytes_of(gpu_out), bytes_of(host_out)) << "embed T=" << T;

    // gather_rows from a row-padded source (a column slice of a wider buffer).
    const Tensor wide = random_bf16({V, d + 8}, rng);
    const Tensor src = wide.narrow(1, 4, d);
    Tensor hg = Tensor::empty({T, d}, DType::bf16, "g");
    gather_rows(src, ids, hg);
    const Tensor wide_gpu = on_gpu(wide);
    Tensor gg = empty_gpu({T, d}, DType::bf16);
    gather_rows(wide_gpu.narrow(1, 4, d), on_gpu(ids), gg);
    sync();
    EXPECT_EQ(bytes_of(gg), bytes_of(hg)) << "gather T=" << T;

    // argmax with ties (every value from a small set) and a NaN or two.
    Tensor logits = Tensor::empty({T, V}, DType::f32, "logits");
    for (int64_t i = 0; i < logits.numel(); ++i) logits.data<float>()[i] = static_cast<float>(rng() % 5);
    if (T > 1) logits.data<float>()[V + 3] = std::numeric_limits<float>::quiet_NaN();
    if (T > 2) logits.data<float>()[2 * V] = std::numeric_limits<float>::quiet_NaN();
    Tensor ha = Tensor::empty({T}, DType::i32, "a");
    argmax_rows(logits, ha);
    Tensor ga = empty_gpu({T}, DType::i32);
    argmax_rows(on_gpu(logits), ga);
    sync();
    EXPECT_EQ(bytes_of(ga), bytes_of(ha)) << "argmax T=" << T;

    // add_bf16 into a column slice of a residual.
    const Tensor a = random_bf16({T, d}, rng), b = random_bf16({T, d}, rng);
    Tensor hr = random_bf16({T, copies * d}, rng);
    Tensor gr = on_gpu(hr);
    Tensor hs = hr.narrow(1, d, d);
    add_bf16(a, b, hs);
    Tensor gs = gr.narrow(1, d, d);
    add_bf16(on_gpu(a), on_gpu(b), gs);
    sync();
    EXPECT_EQ(bytes_of(gr), bytes_of(hr)) << "add T=" << T;

    Tensor hf = Tensor::empty({T, d}, DType::f32, "f");
    scale_bf16(a, 0.037f, hf);
    Tensor gf = empty_gpu({T, d}, DType::f32);
    scale_bf16(on_gpu(a), 0.037f, gf);
    sync();
    EXPECT_EQ(bytes_of(gf), bytes_of(hf)) << "scale T=" << T;
  }
}

TEST(TokenOpsGpu, NextIdsAndPositionBiasEqualTheHost) {
  DSV4_REQUIRE_GPU();
  std::mt19937 rng(12);
  for (int64_t T : kTokenCounts) {
    if (T == 0) continue;
    std::vector<int32_t> id(static_cast<size_t>(T)), pos(static_cast<size_t>(T));
    for (auto& x : id) x = static_cast<int32_t>(rng() % 1000);
    for (auto& x : pos) x = static_cast<int32_t>(rng() % 300);
    // Rows of 1..3 tokens.
    std::vector<int32_t> last, hint, sampled;
    for (int64_t t = 0; t < T;) {
      t = std::min<int64_t>(T, t + 1 + static_cast<int64_t>(rng() % 3));
      last.push_back(static_cast<int32_t>(t - 1));
      hint.push_back(rng() % 2 ? -1 : static_cast<int32_t>(rng() % 1000));
      sampled.push_back(static_cast<int32_t>(rng() % 1000));
    }
    Tensor hn = Tensor::empty({T}, DType::i32, "n");
    mtp_next_ids(ints(id), ints(last), ints(hint), ints(sampled), hn);
    Tensor gn = empty_gpu({T}, DType::i32);
    mtp_next_ids(on_gpu(ints(id)), on_gpu(ints(last)), on_gpu(ints(hint)), on_gpu(ints(sampled)), gn);
    sync();
    EXPECT_EQ(bytes_of(gn), bytes_of(hn)) << "next ids T=" << T;

    const int64_t ratio = 4, C = 10;
    Tensor score = Tensor::empty({T, C}, DType::f32, "s"), bias = Tensor::empty({ratio, C}, DType::f32, "b");
    std::normal_distribution<float> n(0.0f, 1.0f);
    for (int64_t i = 0; i < score.numel(); ++i) score.data<float>()[i] = n(rng);
    for (int64_t i = 0; i < bias.numel(); ++i) bias.data<float>()[i] = n(rng);
    Tensor gs = on_gpu(score);
    add_position_bias(score, bias, ints(pos), ratio);
    add_position_bias(gs, on_gpu(bias), on_gpu(ints(pos)), ratio);
    sync();
    EXPECT_EQ(bytes_of(gs), bytes_of(score)) << "bias T=" << T;
  }
}

Tensor random_u8(const Shape& shape, std::mt19937& rng) {
  Tensor t = Tensor::empty(shape, DType::u8, "u8");
  for (int64_t i = 0; i < t.numel(); ++i) t.data<uint8_t>()[i] = static_cast<uint8_t>(rng());
  return t;
}

Tensor random_f32(const Shape& shape, std::mt19937& rng) {
  Tensor t = Tensor::empty(shape, DType::f32, "f32");
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = n(rng);
  return t;
}

// Word lists padded to the engine's buffer size (2 + 4 * capacity) with words never read.
Tensor words(std::vector<int64_t> w, int64_t capacity) {
  w.resize(static_cast<size_t>(std::max<int64_t>(static_cast<int64_t>(w.size()), 2 + 4 * capacity)), -7);
  Tensor t = Tensor::empty({static_cast<int64_t>(w.size())}, DType::i64, "words");
  std::memcpy(t.data_ptr(), w.data(), w.size() * 8);
  return t;
}

// `count` distinct values from [0, n), in random order.
std::vector<int64_t> distinct(int64_t count, int64_t n, std::mt19937& rng) {
  std::vector<int64_t> all(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) all[static_cast<size_t>(i)] = i;
  std::shuffle(all.begin(), all.end(), rng);
  all.resize(static_cast<size_t>(count));
  return all;
}

// backup_state_rows, backup_entries and scrub_restore (pure byte copies): the device buffers equal the
// host's bit for bit, for MODEL1 pages and indexer key rows, at capacities {0, 1, 2, 7, 8, 64} with
// the lists full (entries) and partial (rows), slots past the counts untouched on both.
TEST(TokenOpsGpu, ScrubCopiesEqualTheHost) {
  DSV4_REQUIRE_GPU();
  std::mt19937 rng(14);
  const Model1Layout layout = model1_layout("test", 64, 16, 16);
  const int64_t page_entries = 4, dims = 16, W = 40;
  for (const bool indexer : {false, true}) {
    const EntrySpans spans = entry_spans(indexer, dims, layout, page_entries);
    for (int64_t C : kTokenCounts) {
      const int64_t pages = C / page_entries + 2, N = C + 5, entries = pages * page_entries;
      Tensor cache = indexer ? random_f32({pages, page_entries, dims}, rng) : random_u8({pages, layout.page_bytes(page_entries)}, rng);
      Tensor state = random_u8({N, W}, rng);
      const std::vector<int64_t> dest = distinct(C, entries, rng), rows = distinct(C - C / 3, N, rng);
      std::vector<int64_t> w = {C};
      w.insert(w.end(), dest.begin(), dest.end());
      w.push_back(static_cast<int64_t>(rows.size()));
      w.insert(w.end(), rows.begin(), rows.end());
      const Tensor bw = words(w, C);
      Tensor he = random_u8({C, spans.entry_bytes()}, rng), hr = random_u8({C, W}, rng);
      Tensor ge = on_gpu(he), gr = on_gpu(hr), gcache = on_gpu(cache), gstate = on_gpu(state);
      const Tensor gbw = on_gpu(bw);
      backup_state_rows(state, bw, hr);
      backup_entries(cache, bw, spans, he);
      backup_state_rows(gstate, gbw, gr);
      backup_entries(gcache, gbw, spans, ge);
      sync();
      EXPECT_EQ(bytes_of(gr), bytes_of(hr)) << "backup_state_rows C=" << C << " indexer=" << indexer;
      EXPECT_EQ(bytes_of(ge), bytes_of(he)) << "backup_entries C=" << C << " indexer=" << indexer;
      for (int rerun = 0; rerun < 10; ++rerun) {
        backup_entries(gcache, gbw, spans, ge);
        backup_state_rows(gstate, gbw, gr);
      }
      sync();
      EXPECT_EQ(bytes_of(gr), bytes_of(hr)) << "rerun C=" << C;
      EXPECT_EQ(bytes_of(ge), bytes_of(he)) << "rerun C=" << C;

      // The drafts overwrite everything; about half of the items are rejected and restored.
      cache = indexer ? random_f32({pages, page_entries, dims}, rng) : random_u8({pages, layout.page_bytes(page_entries)}, rng);
      state = random_u8({N, W}, rng);
      gcache = on_gpu(cache);
      gstate = on_gpu(state);
      std::vector<int64_t> sw = {0};
      for (int64_t j = 0; j < C; ++j) {
        if (rng() % 2 == 0) continue;
        sw.insert(sw.end(), {j, dest[static_cast<size_t>(j)]});
        ++sw[0];
      }
      const size_t s_at = sw.size();
      sw.push_back(0);
      for (size_t j = 0; j < rows.size(); ++j) {
        if (rng() % 2 == 0) continue;
        sw.insert(sw.end(), {static_cast<int64_t>(j), rows[j]});
        ++sw[s_at];
      }
      const Tensor scw = words(sw, C);
      scrub_restore(he, hr, scw, spans, cache, state);
      const Tensor gscw = on_gpu(scw);
      for (int rerun = 0; rerun < 10; ++rerun) scrub_restore(ge, gr, gscw, spans, gcache, gstate);
      sync();
      EXPECT_EQ(bytes_of(gcache), bytes_of(cache)) << "scrub cache C=" << C << " indexer=" << indexer;
      EXPECT_EQ(bytes_of(gstate), bytes_of(state)) << "scrub state C=" << C << " indexer=" << indexer;
    }
  }
}

// On a GPU the counts and indices are not checked: an item out of range is skipped, and a count that
// does not fit the words (or the saved buffer) writes nothing. The host refuses the same lists.
TEST(TokenOpsGpu, ScrubCopiesSkipItemsOutOfRange) {
  DSV4_REQUIRE_GPU();
  std::mt19937 rng(15);
  const Model1Layout layout = model1_layout("test", 64, 16, 16);
  const EntrySpans spans = entry_spans(false, 64, layout, 4);
  const int64_t C = 3, N = 6, W = 24, entries = 8;
  const Tensor cache = random_u8({2, layout.page_bytes(4)}, rng), state = random_u8({N, W}, rng);
  const Tensor saved_e = random_u8({C, spans.entry_bytes()}, rng), saved_r = random_u8({C, W}, rng);
  const std::vector<uint8_t> cache0 = bytes_of(cache), state0 = bytes_of(state);
  const std::vector<uint8_t> e0 = bytes_of(saved_e), r0 = bytes_of(saved_r);
  const int64_t eb = spans.entry_bytes();

  // Backup: entry dests {-1, 5, 8}, rows {1, N, -3}: only dest 5 (slot 1) and row 1 (slot 0) copied.
  const Tensor bad = words({3, -1, 5, entries, 3, 1, N, -3}, C);
  {
    Tensor h_saved = saved_r;  // the host refuses before it writes
    EXPECT_THROW(backup_state_rows(state, bad, h_saved), ContractError);
  }
  {
    Tensor ge = on_gpu(saved_e), gr = on_gpu(saved_r);
    backup_state_rows(on_gpu(state), on_gpu(bad), gr);
    backup_entries(on_gpu(cache), on_gpu(bad), spans, ge);
    sync();
    std::vector<uint8_t> want_e = e0, want_r = r0;
    int64_t at = 0;
    for (int part = 0; part < 2; ++part) {
      const ByteSpan b = spans.span(5, part);
      std::memcpy(want_e.data() + eb + at, cache0.data() + b.offset, static_cast<size_t>(b.bytes));
      at += b.bytes;
    }
    std::memcpy(want_r.data(), state0.data() + W, static_cast<size_t>(W));
    EXPECT_EQ(bytes_of(ge), want_e);
    EXPECT_EQ(bytes_of(gr), want_r);
  }
  // Counts that do not fit: nothing written.
  for (const std::vector<int64_t>& w : {std::vector<int64_t>{1000000, 0, 1}, std::vector<int64_t>{-5, 0, 1},
                                        std::vector<int64_t>{0, 1000000, 1}}) {
    Tensor ge = on_gpu(saved_e), gr = on_gpu(saved_r), gc = on_gpu(cache), gs = on_gpu(state);
    const Tensor gw = on_gpu(words(w, 0));
    backup_state_rows(gs, gw, gr);
    backup_entries(gc, gw, spans, ge);
    scrub_restore(ge, gr, gw, spans, gc, gs);
    sync();
    EXPECT_EQ(bytes_of(ge), e0);
    EXPECT_EQ(bytes_of(gr), r0);
    EXPECT_EQ(bytes_of(gc), cache0);
    EXPECT_EQ(bytes_of(gs), state0);
  }
  // Scrub: entries (slot 3, dest 0), (0, -1), (2, 6); rows (-1, 0), (1, N), (2, 4): only entry 6 from
  // slot 2 and row 4 from slot 2 restored.
  const Tensor sw = words({3, 3, 0, 0, -1, 2, 6, 3, -1, 0, 1, N, 2, 4}, C);
  {
    Tensor h_cache = cache, h_state = state;  // the host refuses before it writes
    EXPECT_THROW(scrub_restore(saved_e, saved_r, sw, spans, h_cache, h_state), ContractError);
  }
  Tensor gc = on_gpu(cache), gs = on_gpu(state);
  scrub_restore(on_gpu(saved_e), on_gpu(saved_r), on_gpu(sw), spans, gc, gs);
  sync();
  std::vector<uint8_t> want_c = cache0, want_s = state0;
  int64_t at = 0;
  for (int part = 0; part < 2; ++part) {
    const ByteSpan b = spans.span(6, part);
    std::memcpy(want_c.data() + b.offset, e0.data() + 2 * eb + at, static_cast<size_t>(b.bytes));
    at += b.bytes;
  }
  std::memcpy(want_s.data() + 4 * W, r0.data() + 2 * W, static_cast<size_t>(W));
  EXPECT_EQ(bytes_of(gc), want_c);
  EXPECT_EQ(bytes_of(gs), want_s);

  // Mixed devices are refused.
  Tensor gr = on_gpu(saved_r);
  EXPECT_THROW(backup_state_rows(on_gpu(state), bad, gr), ContractError);
}

// Prefill CP's row copies. copy_rows from a column slice of a wider buffer (row strides that do and
// do not keep 16-byte alignment, so every word width of the kernel runs) and unshard_rows for 2 and 4
// ranks at token counts that are not multiples: the device rows equal the host's bit for bit, ten
// reruns too, and the testing allocator's poison past T stays (nothing written past the rows).
TEST(TokenOpsGpu, CpRowCopiesEqualTheHost) {
  DSV4_REQUIRE_GPU();
  std::mt19937 rng(16);
  for (int64_t T : kTokenCounts) {
    // (wide, first, width, dtype), in elements: strides, offsets and row bytes aligned to 16, 8, 4
    // and 1 bytes (the kernel's word widths), an odd bf16 stride among them.
    using Slice = std::tuple<int64_t, int64_t, int64_t, DType>;
    for (const auto& [wide_w, first, width, dtype] :
         {Slice{24, 8, 8, DType::bf16}, Slice{40, 4, 32, DType::f32}, Slice{6, 2, 2, DType::f32},
          Slice{5, 1, 3, DType::f32}, Slice{37, 3, 11, DType::bf16}, Slice{13, 1, 7, DType::u8}}) {
      Tensor wide = random_u8({T, wide_w * dtype_storage_bytes(dtype, 1)}, rng);
      const Tensor wide_h = Tensor::over(wide.storage(), dtype, {T, wide_w});
      Tensor host = Tensor::empty({T, width}, dtype, "dst");
      copy_rows(wide_h.narrow(1, first, width), host);
      const Tensor wide_g = on_gpu(wide_h);
      for (int rerun = 0; rerun < 10; ++rerun) {
        Tensor dev = empty_gpu({T, width}, dtype);
        copy_rows(wide_g.narrow(1, first, width), dev);
        sync();
        EXPECT_EQ(bytes_of(dev), bytes_of(host)) << "copy_rows T=" << T << " width " << width << " rerun " << rerun;
      }
    }
    for (int64_t ranks : {2, 4}) {
      const int64_t L = (T + ranks - 1) / ranks;
      for (const auto& [width, dtype] : {std::pair<int64_t, DType>{24, DType::bf16},
                                         std::pair<int64_t, DType>{7, DType::bf16},
                                         std::pair<int64_t, DType>{10, DType::f32}}) {
        const Tensor bytes = random_u8({ranks * L, width * dtype_storage_bytes(dtype, 1)}, rng);
        const Tensor gathered = Tensor::over(bytes.storage(), dtype, {ranks * L, width});
        Tensor host = Tensor::empty({T, width}, dtype, "global");
        unshard_rows(gathered, ranks, host);
        const Tensor gathered_g = on_gpu(gathered);
        for (int rerun = 0; rerun < 10; ++rerun) {
          // One row more than T in the buffer: its poison must survive.
          Tensor buffer = empty_gpu({T + 1, width}, dtype);
          const std::vector<uint8_t> poison = bytes_of(buffer.narrow(0, T, 1));
          Tensor dev = buffer.narrow(0, 0, T);
          unshard_rows(gathered_g, ranks, dev);
          sync();
          EXPECT_EQ(bytes_of(dev), bytes_of(host)) << "unshard_rows T=" << T << " ranks " << ranks << " rerun " << rerun;
          EXPECT_EQ(bytes_of(buffer.narrow(0, T, 1)), poison) << "row T written";
        }
      }
    }
  }
  // Contracts on device tensors: a strided dst or global, mixed devices.
  const Tensor src = on_gpu(random_bf16({4, 8}, rng));
  Tensor strided = empty_gpu({4, 16}, DType::bf16).narrow(1, 0, 8);
  EXPECT_THROW(copy_rows(src, strided), ContractError);
  EXPECT_THROW(unshard_rows(src, 2, strided), ContractError);
  Tensor host_dst = Tensor::empty({4, 8}, DType::bf16, "dst");
  EXPECT_THROW(copy_rows(src, host_dst), ContractError);
  EXPECT_THROW(unshard_rows(src, 2, host_dst), ContractError);
}

TEST(TokenOpsGpu, CopiesAndMixedDevicesAreRefused) {
  DSV4_REQUIRE_GPU();
  std::mt19937 rng(13);
  const Tensor x = random_bf16({5, 6}, rng);
  Tensor g = empty_gpu({5, 6}, DType::bf16);
  copy_from_host(g, x.data_ptr(), 60);
  Tensor g2 = empty_gpu({5, 6}, DType::bf16);
  copy_tensor(g, g2);
  sync();
  EXPECT_EQ(bytes_of(g2), bytes_of(x));
  Tensor host_out = Tensor::empty({5, 12}, DType::bf16, "out");
  EXPECT_THROW(embed_rows(on_gpu(ints({0, 1, 2, 3, 4})), x, 2, host_out), ContractError);
  EXPECT_THROW(copy_from_host(g, x.data_ptr(), 1000), ContractError);
}

}  // namespace
}  // namespace dsv4::kernels
