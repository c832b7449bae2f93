// Encode (f32 -> code) and decode (code -> f32) throughput of each narrow format, one scalar
// conversion per element over a buffer that stays in L1.
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "engine/core/formats.h"

namespace dsv4 {
namespace {

constexpr int kElements = 4096;

// Inputs spread over the interesting range of the narrow formats (subnormals to overflow).
std::vector<float> encode_inputs() {
  std::mt19937 rng(12345);
  std::uniform_real_distribution<float> exponent(-20.0f, 20.0f);
  std::uniform_real_distribution<float> mantissa(-1.0f, 1.0f);
  std::vector<float> inputs(kElements);
  for (float& x : inputs) x = mantissa(rng) * std::exp2(exponent(rng));
  return inputs;
}

template <typename Code, Code (*kEncode)(float)>
void bm_encode(benchmark::State& state) {
  const std::vector<float> inputs = encode_inputs();
  std::vector<Code> codes(kElements);
  for (auto _ : state) {
    for (int i = 0; i < kElements; ++i) codes[i] = kEncode(inputs[i]);
    benchmark::DoNotOptimize(codes.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * kElements);
}

template <typename Code, float (*kDecode)(Code), uint32_t kCodeMask>
void bm_decode(benchmark::State& state) {
  std::vector<Code> codes(kElements);
  std::mt19937 rng(6789);
  for (Code& c : codes) c = static_cast<Code>(rng() & kCodeMask);
  std::vector<float> values(kElements);
  for (auto _ : state) {
    for (int i = 0; i < kElements; ++i) values[i] = kDecode(codes[i]);
    benchmark::DoNotOptimize(values.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * kElements);
}

void bm_fp4_unpack_decode(benchmark::State& state) {
  std::vector<uint8_t> packed(kElements / 2);
  std::mt19937 rng(42);
  for (uint8_t& b : packed) b = static_cast<uint8_t>(rng());
  std::vector<float> values(kElements);
  for (auto _ : state) {
    for (int i = 0; i < kElements; ++i) values[i] = e2m1_to_f32(fp4_get(packed.data(), i));
    benchmark::DoNotOptimize(values.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * kElements);
}

BENCHMARK(bm_encode<uint16_t, f32_to_bf16>)->Name("encode/bf16");
BENCHMARK(bm_encode<uint16_t, f32_to_f16>)->Name("encode/f16");
BENCHMARK(bm_encode<uint8_t, f32_to_e4m3fn>)->Name("encode/e4m3fn");
BENCHMARK(bm_encode<uint8_t, f32_to_e4m3fnuz>)->Name("encode/e4m3fnuz");
BENCHMARK(bm_encode<uint8_t, f32_to_e5m2>)->Name("encode/e5m2");
BENCHMARK(bm_encode<uint8_t, f32_to_e2m1>)->Name("encode/e2m1");
BENCHMARK(bm_encode<uint8_t, f32_to_ue8m0_ceil>)->Name("encode/ue8m0_ceil");

BENCHMARK(bm_decode<uint16_t, bf16_to_f32, 0xFFFFu>)->Name("decode/bf16");
BENCHMARK(bm_decode<uint16_t, f16_to_f32, 0xFFFFu>)->Name("decode/f16");
BENCHMARK(bm_decode<uint8_t, e4m3fn_to_f32, 0xFFu>)->Name("decode/e4m3fn");
BENCHMARK(bm_decode<uint8_t, e4m3fnuz_to_f32, 0xFFu>)->Name("decode/e4m3fnuz");
BENCHMARK(bm_decode<uint8_t, e5m2_to_f32, 0xFFu>)->Name("decode/e5m2");
BENCHMARK(bm_decode<uint8_t, e2m1_to_f32, 0xFu>)->Name("decode/e2m1");
BENCHMARK(bm_decode<uint8_t, ue8m0_to_f32, 0xFFu>)->Name("decode/ue8m0");
BENCHMARK(bm_fp4_unpack_decode)->Name("decode/e2m1_packed");

}  // namespace
}  // namespace dsv4
