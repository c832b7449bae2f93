// kernels/token_ops.h: contracts, the host implementations and the choice of device.
#include "kernels/token_ops.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "engine/core/contract.h"
#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "kernels/device.h"
#include "kernels/host/host_common.h"

namespace dsv4::kernels {

using namespace host;

namespace {

Contract::Values values_for(bool gpu) { return gpu ? Contract::Values::skip : Contract::Values::check; }


}  // namespace

void embed_rows(const Tensor& ids, const Tensor& table, int64_t copies, Tensor& out) {
  const char* op = "embed_rows";
  if (copies < 1) throw ContractError(op, "copies", "must be >= 1, got " + std::to_string(copies));
  const bool gpu = runs_on_gpu(op, {{"ids", &ids}, {"table", &table}, {"out", &out}});
  Contract(op)
      .arg("ids").dtype(DType::i32).rank(1).contiguous().values_index_into(0, "table", 0)
      .arg("table").dtype(DType::bf16).rank(2).contiguous()
      .arg("out").dtype(DType::bf16).rank(2).contiguous().same_size(0, "ids", 0)
      .check({{"ids", &ids}, {"table", &table}, {"out", &out}}, values_for(gpu));
  const int64_t T = ids.size(0), d = table.size(1);
  if (out.size(1) != copies * d) {
    throw ContractError(op, "out", "needs shape[1] = copies * table.shape[1] = " + std::to_string(copies * d) +
                                       ", got " + shape_str(out.shape()));
  }
  if (gpu) DSV4_GPU_OR_FAIL(op, cuda::embed_rows(ids, table, copies, out, current_stream()));
  const auto* id = ids.data<int32_t>();
  const auto* tab = table.data<uint16_t>();
  auto* o = out.data<uint16_t>();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t c = 0; c < copies; ++c) {
      std::memcpy(o + (t * copies + c) * d, tab + id[t] * d, static_cast<size_t>(d) * 2);
    }
  }
}

void gather_rows(const Tensor& src, const Tensor& index, Tensor& out) {
  const char* op = "gather_rows";
  const bool gpu = runs_on_gpu(op, {{"src", &src}, {"index", &index}, {"out", &out}});
  Contract(op)
      .arg("src").rank(2).inner_contiguous()
      .arg("index").dtype(DType::i32).rank(1).contiguous().values_index_into(0, "src", 0)
      .arg("out").dtype(src.dtype()).rank(2).contiguous().same_size(0, "index", 0).same_size(1, "src", 1)
      .check({{"src", &src}, {"index", &index}, {"out", &out}}, values_for(gpu));
  if (src.dtype() == DType::f4_e2m1) throw ContractError(op, "src", "needs a whole-byte dtype, got f4_e2m1");
  if (gpu) DSV4_GPU_OR_FAIL(op, cuda::gather_rows(src, index, out, current_stream()));
  const int64_t es = dtype_storage_bytes(src.dtype(), 1), W = src.size(1);
  const auto* s = static_cast<const uint8_t*>(src.data_ptr());
  auto* o = static_cast<uint8_t*>(out.data_ptr());
  const auto* ix = index.data<int32_t>();
  for (int64_t r = 0; r < index.size(0); ++r) {
    std::memcpy(o + r * W * es, s + ix[r] * src.stride(0) * es, static_cast<size_t>(W * es));
  }
}

void argmax_rows(const Tensor& logits, Tensor& out) {
  const char* op = "argmax_rows";
  const bool gpu = runs_on_gpu(op, {{"logits", &logits}, {"out", &out}});
  Contract(op)
      .arg("logits").dtype(DType::f32).rank(2).contiguous()
      .arg("out").dtype(DType::i32).rank(1).contiguous().same_size(0, "logits", 0)
      .check({{"logits", &logits}, {"out", &out}});
  if (logits.size(1) < 1) throw ContractError(op, "logits", "needs at least one column");
  if (gpu) DSV4_GPU_OR_FAIL(op, cuda::argmax_rows(logits, out, current_stream()));
  const int64_t V = logits.size(1);
  for (int64_t r = 0; r < logits.size(0); ++r) {
    const float* row = logits.data<float>() + r * V;
    out.data<int32_t>()[r] = static_cast<int32_t>(std::max_element(row, row + V) - row);
  }
}

void mtp_next_ids(const Tensor& ids, const Tensor& last, const Tensor& hint, const Tensor& sampled, Tensor& next) {
  const char* op = "mtp_next_ids";
  const bool gpu = runs_on_gpu(op, {{"ids", &ids}, {"last", &last}, {"hint", &hint}, {"sampled", &sampled}, {"next", &next}});
  Contract(op)
      .arg("ids").dtype(DType::i32).rank(1).contiguous()
      .arg("last").dtype(DType::i32).rank(1).contiguous().values_index_into(0, "ids", 0)
      .arg("hint").dtype(DType::i32).rank(1).contiguous().same_size(0, "last", 0)
      .arg("sampled").dtype(DType::i32).rank(1).contiguous().same_size(0, "last", 0)
      .arg("next").dtype(DType::i32).rank(1).contiguous().same_size(0, "ids", 0)
      .check({{"ids", &ids}, {"last", &last}, {"hint", &hint}, {"sampled", &sampled}, {"next", &next}}, values_for(gpu));
  if (gpu) DSV4_GPU_OR_FAIL(op, cuda::mtp_next_ids(ids, last, hint, sampled, next, current_stream()));
  const auto* id = ids.data<int32_t>();
  const auto* ls = last.data<int32_t>();
  auto* nx = next.data<int32_t>();
  int64_t t = 0;
  for (int64_t r = 0; r < last.size(0); ++r) {
    if (ls[r] < t) throw ContractError(op, "last", "must be strictly increasing (row " + std::to_string(r) + ")");
    for (; t < ls[r]; ++t) nx[t] = id[t + 1];
    const int32_t h = hint.data<int32_t>()[r];
    nx[t++] = h >= 0 ? h : sampled.data<int32_t>()[r];
  }
}

void add_bf16(const Tensor& a, const Tensor& b, Tensor& out) {
  const char* op = "add_bf16";
  const bool gpu = runs_on_gpu(op, {{"a", &a}, {"b", &b}, {"out", &out}});
  Contract(op)
      .arg("a").dtype(DType::bf16).rank(2).contiguous()
      .arg("b").dtype(DType::bf16).rank(2).contiguous().same_size(0, "a", 0).same_size(1, "a", 1)
      .arg("out").dtype(DType::bf16).rank(2).inner_contiguous().same_size(0, "a", 0).same_size(1, "a", 1)
      .check({{"a", &a}, {"b", &b}, {"out", &out}});
  if (gpu) DSV4_GPU_OR_FAIL(op, cuda::add_bf16(a, b, out, current_stream()));
  const int64_t T = a.size(0), d = a.size(1);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < d; ++i) {
      const float v = bf16_to_f32(a.data<uint16_t>()[t * d + i]) + bf16_to_f32(b.data<uint16_t>()[t * d + i]);
      out.data<uint16_t>()[t * out.stride(0) + i] = f32_to_bf16(v);
    }
  }
}

void add_position_bias(Tensor& score, const Tensor& bias, const Tensor& positions, int64_t ratio) {
  const char* op = "add_position_bias";
  if (ratio < 1) throw ContractError(op, "ratio", "must be >= 1, got " + std::to_string(ratio));
  const bool gpu = runs_on_gpu(op, {{"score", &score}, {"bias", &bias}, {"positions", &positions}});
  Contract(op)
      .arg("score").dtype(DType::f32).rank(2).contiguous()
      .arg("bias").dtype(DType::f32).rank(2).contiguous().dim(0, ratio).same_size(1, "score", 1)
      .arg("positions").dtype(DType::i32).rank(1).contiguous().same_size(0, "score", 0).values_in(0, kInt32Max)
      .check({{"score", &score}, {"bias", &bias}, {"positions", &positions}}, values_for(gpu));
  if (gpu) DSV4_GPU_OR_FAIL(op, cuda::add_position_bias(score, bias, positions, ratio, current_stream()));
  const int64_t cols = score.size(1);
  auto* s = score.data<float>();
  const auto* a = bias.data<float>();
  const auto* ps = positions.data<int32_t>();
  for (int64_t t = 0; t < score.size(0); ++t) {
    const float* ar = a + (ps[t] % ratio) * cols;
    for (int64_t c = 0; c < cols; ++c) s[t * cols + c] += ar[c];
  }
}

void scale_bf16(const Tensor& x, float scale, Tensor& out) {
  const char* op = "scale_bf16";
  const bool gpu = runs_on_gpu(op, {{"x", &x}, {"out", &out}});
  Contract(op).arg("x").dtype(DType::bf16).contiguous().arg("out").dtype(DType::f32).contiguous().check({{"x", &x}, {"out", &out}});
  if (x.numel() != out.numel()) {
    throw ContractError(op, "out", "needs x's " + std::to_string(x.numel()) + " elements, got " + std::to_string(out.numel()));
  }
  if (gpu) DSV4_GPU_OR_FAIL(op, cuda::scale_bf16(x, scale, out, current_stream()));
  const auto* src = x.data<uint16_t>();
  auto* dst = out.data<float>();
  for (int64_t i = 0; i < x.numel(); ++i) dst[i] = round_bf16(bf16_to_f32(src[i]) * scale);
}

void copy_from_host(Tensor& dst, const void* src, int64_t bytes) {
  const char* op = "copy_from_host";
  const int64_t begin = dtype_storage_bytes(dst.dtype(), dst.offset());
  const int64_t capacity = dtype_storage_bytes(dst.dtype(), dst.storage_elements());
  if (bytes < 0 || begin + bytes > capacity) {
    throw ContractError(op, "bytes", std::to_string(bytes) + " bytes from byte " + std::to_string(begin) +
                                         " overrun the storage of " + std::to_string(capacity) + " bytes");
  }
  if (bytes == 0) return;
  auto* d = static_cast<uint8_t*>(dst.storage()->data()) + begin;
  if (on_gpu(dst)) DSV4_GPU_OR_FAIL(op, cuda::copy_bytes(d, src, bytes, /*from_host=*/true, current_stream()));
  std::memcpy(d, src, static_cast<size_t>(bytes));
}

void copy_tensor(const Tensor& src, Tensor& dst) {
  const char* op = "copy_tensor";
  const bool gpu = runs_on_gpu(op, {{"src", &src}, {"dst", &dst}});
  Contract(op)
      .arg("src").contiguous()
      .arg("dst").dtype(src.dtype()).contiguous()
      .check({{"src", &src}, {"dst", &dst}});
  if (src.numel() != dst.numel()) {
    throw ContractError(op, "dst", "needs src's " + std::to_string(src.numel()) + " elements, got " +
                                       std::to_string(dst.numel()));
  }
  const int64_t bytes = dtype_storage_bytes(src.dtype(), src.numel());
  if (bytes == 0) return;
  if (gpu) DSV4_GPU_OR_FAIL(op, cuda::copy_bytes(dst.data_ptr(), src.data_ptr(), bytes, /*from_host=*/false, current_stream()));
  std::memcpy(dst.data_ptr(), src.data_ptr(), static_cast<size_t>(bytes));
}

namespace {

// A ContractError unless `t` (named `name`) has a whole-byte dtype; returns its element bytes.
int64_t whole_byte_size(const char* op, const char* name, const Tensor& t) {
  if (t.dtype() == DType::f4_e2m1) throw ContractError(op, name, "needs a whole-byte dtype, got f4_e2m1");
  return dtype_storage_bytes(t.dtype(), 1);
}

// dst row r (dense, row_bytes) = src row (r % ranks) * share + r / ranks (src_stride bytes apart): the
// host loop of copy_rows (ranks 1) and unshard_rows.
void copy_mapped_rows(const uint8_t* src, int64_t src_stride, int64_t rows, int64_t row_bytes, int64_t ranks,
                      int64_t share, uint8_t* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * row_bytes, src + ((r % ranks) * share + r / ranks) * src_stride, static_cast<size_t>(row_bytes));
  }
}

}  // namespace

void copy_rows(const Tensor& src, Tensor& dst) {
  const char* op = "copy_rows";
  const bool gpu = runs_on_gpu(op, {{"src", &src}, {"dst", &dst}});
  Contract(op)
      .arg("src").rank(2).inner_contiguous()
      .arg("dst").dtype(src.dtype()).rank(2).contiguous().same_size(0, "src", 0).same_size(1, "src", 1)
      .check({{"src", &src}, {"dst", &dst}});
  const int64_t es = whole_byte_size(op, "src", src);
  if (src.numel() == 0) return;
  if (gpu) DSV4_GPU_OR_FAIL(op, cuda::copy_rows(src, dst, current_stream()));
  copy_mapped_rows(static_cast<const uint8_t*>(src.data_ptr()), src.stride(0) * es, src.size(0), src.size(1) * es, 1,
                   src.size(0), static_cast<uint8_t*>(dst.data_ptr()));
}

void unshard_rows(const Tensor& gathered, int64_t ranks, Tensor& global) {
  const char* op = "unshard_rows";
  if (ranks < 1) throw ContractError(op, "ranks", "must be >= 1, got " + std::to_string(ranks));
  const bool gpu = runs_on_gpu(op, {{"gathered", &gathered}, {"global", &global}});
  Contract(op)
      .arg("gathered").rank(2).contiguous().dim_multiple_of(0, ranks)
      .arg("global").dtype(gathered.dtype()).rank(2).contiguous().same_size(1, "gathered", 1)
      .check({{"gathered", &gathered}, {"global", &global}});
  const int64_t es = whole_byte_size(op, "gathered", gathered);
  const int64_t share = gathered.size(0) / ranks, T = global.size(0);
  if (T > gathered.size(0)) {
    throw ContractError(op, "global", "needs shape[0] <= gathered.shape[0] = ranks * L = " +
                                          std::to_string(gathered.size(0)) + ", got " + shape_str(global.shape()));
  }
  if (global.numel() == 0) return;
  if (gpu) DSV4_GPU_OR_FAIL(op, cuda::unshard_rows(gathered, ranks, global, current_stream()));
  const int64_t row_bytes = global.size(1) * es;
  copy_mapped_rows(static_cast<const uint8_t*>(gathered.data_ptr()), row_bytes, T, row_bytes, ranks, share,
                   static_cast<uint8_t*>(global.data_ptr()));
}

EntrySpans entry_spans(bool indexer, int64_t dims, const Model1Layout& model1, int64_t page_entries) {
  EntrySpans s;
  s.f32_rows = indexer;
  if (indexer) {
    s.dims = dims;
  } else {
    s.value_bytes = model1.value_bytes();
    s.scale_bytes = model1.scale_bytes();
    s.page_bytes = model1.page_bytes(page_entries);
    s.page_entries = page_entries;
  }
  return s;
}

namespace {

void check_spans(const char* op, const EntrySpans& s) {
  if (s.f32_rows) {
    if (s.dims < 1) throw ContractError(op, "spans", "f32 rows need dims >= 1, got " + std::to_string(s.dims));
    return;
  }
  if (s.value_bytes < 1 || s.scale_bytes < 0 || s.page_entries < 1 || s.page_bytes < s.page_entries * s.entry_bytes()) {
    throw ContractError(op, "spans",
                        "MODEL1 spans need value_bytes >= 1, scale_bytes >= 0, page_entries >= 1 and page_bytes >= "
                        "page_entries * (value_bytes + scale_bytes), got " + std::to_string(s.value_bytes) + ", " +
                            std::to_string(s.scale_bytes) + ", " + std::to_string(s.page_entries) + ", " +
                            std::to_string(s.page_bytes));
  }
}

// The cache's bytes (contiguous, whole-byte dtype).
int64_t cache_bytes(const char* op, const Tensor& cache) {
  if (cache.dtype() == DType::f4_e2m1) throw ContractError(op, "cache", "needs a whole-byte dtype, got f4_e2m1");
  return dtype_storage_bytes(cache.dtype(), cache.numel());
}

void check_words_size(const char* op, const Tensor& words) {
  if (words.size(0) < 2) throw ContractError(op, "words", "needs at least the 2 count words, got " + shape_str(words.shape()));
}

// Host value rule: w in [lo, hi].
void check_word(const char* op, const char* what, int64_t w, int64_t lo, int64_t hi) {
  if (w < lo || w > hi) {
    throw ContractError(op, "words", std::string(what) + " " + std::to_string(w) + " outside [" + std::to_string(lo) + ", " +
                                         std::to_string(hi) + "]");
  }
}

}  // namespace

void backup_state_rows(const Tensor& state, const Tensor& words, Tensor& saved) {
  const char* op = "backup_state_rows";
  const bool gpu = runs_on_gpu(op, {{"state", &state}, {"words", &words}, {"saved", &saved}});
  Contract(op)
      .arg("state").dtype(DType::u8).rank(2).contiguous()
      .arg("words").dtype(DType::i64).rank(1).contiguous()
      .arg("saved").dtype(DType::u8).rank(2).contiguous().same_size(1, "state", 1)
      .check({{"state", &state}, {"words", &words}, {"saved", &saved}});
  check_words_size(op, words);
  if (gpu) DSV4_GPU_OR_FAIL(op, cuda::backup_state_rows(state, words, saved, current_stream()));
  const int64_t* w = words.data<int64_t>();
  const int64_t n = words.size(0), W = state.size(1);
  check_word(op, "E", w[0], 0, n - 2);
  const int64_t E = w[0], S = w[1 + E];
  check_word(op, "S", S, 0, std::min(saved.size(0), n - 2 - E));
  for (int64_t j = 0; j < S; ++j) check_word(op, "state row", w[2 + E + j], 0, state.size(0) - 1);
  for (int64_t j = 0; j < S; ++j) {
    std::memcpy(saved.data<uint8_t>() + j * W, state.data<uint8_t>() + w[2 + E + j] * W, static_cast<size_t>(W));
  }
}

void backup_entries(const Tensor& cache, const Tensor& words, const EntrySpans& spans, Tensor& saved) {
  const char* op = "backup_entries";
  const bool gpu = runs_on_gpu(op, {{"cache", &cache}, {"words", &words}, {"saved", &saved}});
  check_spans(op, spans);
  Contract(op)
      .arg("cache").contiguous()
      .arg("words").dtype(DType::i64).rank(1).contiguous()
      .arg("saved").dtype(DType::u8).rank(2).contiguous().dim(1, spans.entry_bytes())
      .check({{"cache", &cache}, {"words", &words}, {"saved", &saved}});
  const int64_t entries = spans.capacity(cache_bytes(op, cache));
  check_words_size(op, words);
  if (gpu) DSV4_GPU_OR_FAIL(op, cuda::backup_entries(cache, words, spans, saved, current_stream()));
  const int64_t* w = words.data<int64_t>();
  const int64_t n = words.size(0), width = saved.size(1);
  check_word(op, "E", w[0], 0, std::min(saved.size(0), n - 1));
  const int64_t E = w[0];
  for (int64_t j = 0; j < E; ++j) check_word(op, "entry", w[1 + j], 0, entries - 1);
  const auto* c = static_cast<const uint8_t*>(cache.data_ptr());
  for (int64_t j = 0; j < E; ++j) {
    int64_t at = 0;
    for (int part = 0; part < 2; ++part) {
      const ByteSpan b = spans.span(w[1 + j], part);
      std::memcpy(saved.data<uint8_t>() + j * width + at, c + b.offset, static_cast<size_t>(b.bytes));
      at += b.bytes;
    }
  }
}

void scrub_restore(const Tensor& saved_entries, const Tensor& saved_rows, const Tensor& words, const EntrySpans& spans,
                   Tensor& cache, Tensor& state) {
  const char* op = "scrub_restore";
  const Contract::Args args = {{"saved_entries", &saved_entries}, {"saved_rows", &saved_rows}, {"words", &words},
                               {"cache", &cache}, {"state", &state}};
  const bool gpu = runs_on_gpu(op, {{"saved_entries", &saved_entries}, {"saved_rows", &saved_rows}, {"words", &words},
                                    {"cache", &cache}, {"state", &state}});
  check_spans(op, spans);
  Contract(op)
      .arg("saved_entries").dtype(DType::u8).rank(2).contiguous().dim(1, spans.entry_bytes())
      .arg("saved_rows").dtype(DType::u8).rank(2).contiguous().same_size(1, "state", 1)
      .arg("words").dtype(DType::i64).rank(1).contiguous()
      .arg("cache").contiguous()
      .arg("state").dtype(DType::u8).rank(2).contiguous()
      .check(args);
  const int64_t entries = spans.capacity(cache_bytes(op, cache));
  check_words_size(op, words);
  if (gpu) DSV4_GPU_OR_FAIL(op, cuda::scrub_restore(saved_entries, saved_rows, words, spans, cache, state, current_stream()));
  const int64_t* w = words.data<int64_t>();
  const int64_t n = words.size(0), width = saved_entries.size(1), W = state.size(1);
  check_word(op, "E", w[0], 0, std::min(saved_entries.size(0), (n - 2) / 2));
  const int64_t E = w[0], S = w[1 + 2 * E];
  check_word(op, "S", S, 0, std::min(saved_rows.size(0), (n - 2 - 2 * E) / 2));
  for (int64_t e = 0; e < E; ++e) {
    check_word(op, "entry slot", w[1 + 2 * e], 0, saved_entries.size(0) - 1);
    check_word(op, "entry", w[2 + 2 * e], 0, entries - 1);
  }
  for (int64_t e = 0; e < S; ++e) {
    check_word(op, "row slot", w[2 + 2 * E + 2 * e], 0, saved_rows.size(0) - 1);
    check_word(op, "state row", w[3 + 2 * E + 2 * e], 0, state.size(0) - 1);
  }
  auto* c = static_cast<uint8_t*>(cache.data_ptr());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t j = w[1 + 2 * e], dest = w[2 + 2 * e];
    int64_t at = 0;
    for (int part = 0; part < 2; ++part) {
      const ByteSpan b = spans.span(dest, part);
      std::memcpy(c + b.offset, saved_entries.data<uint8_t>() + j * width + at, static_cast<size_t>(b.bytes));
      at += b.bytes;
    }
  }
  for (int64_t e = 0; e < S; ++e) {
    const int64_t j = w[2 + 2 * E + 2 * e], row = w[3 + 2 * E + 2 * e];
    std::memcpy(state.data<uint8_t>() + row * W, saved_rows.data<uint8_t>() + j * W, static_cast<size_t>(W));
  }
}

}  // namespace dsv4::kernels
