// The strided-input property's op table (properties/view_ops.h): every entry point passes on every
// layout it can be given, the check itself catches a kernel that ignores the row stride (seed bug
// A1) and one that writes past its view, and generated specs reach every op and layout.
#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "engine/core/error.h"
#include "kernels/norm_rope.h"
#include "properties/view_ops.h"

namespace dsv4::props {
namespace {

// The pads a layout is tried with: the smallest, and the qkv_a shape (a prefix wider than the slice).
std::vector<int64_t> pads_for(const std::string& layout, int64_t width) {
  if (layout == "row-padded") return {1, 7};
  if (layout == "column-slice") return {1, 3 * width};
  if (layout == "transposed") return {0, 2};
  return {0};
}

TEST(ViewOps, TableCoversTheTokenMajorEntryPoints) {
  const std::vector<std::string> names = view_op_names();
  EXPECT_GE(names.size(), 8u);
  for (const char* required : {"fused_norm_rope_inplace", "fused_norm_rope_store_kv", "rms_norm", "q_norm_rope_inplace",
                               "inverse_rope_inplace", "act_quant_fp8", "act_quant_int8", "linear_projection.fp8",
                               "grouped_wo_a", "indexer_q", "cast_host", "moe_gate"}) {
    EXPECT_NE(std::find(names.begin(), names.end(), required), names.end()) << required;
  }
  EXPECT_EQ(std::set<std::string>(names.begin(), names.end()).size(), names.size()) << "op names must be unique";
}

// Every op x layout x T in {0, 1, 2, 5} on the real kernels: equal to the contiguous copy, or refused.
TEST(ViewOps, EveryOpPassesOnEveryLayoutAndSmallT) {
  for (const ViewOp& op : view_ops()) {
    for (const std::string& layout : op.layouts) {
      for (const int64_t tokens : {0, 1, 2, 5}) {
        for (const int64_t pad : pads_for(layout, op.width)) {
          const ViewSpec spec{op.name, tokens, layout, pad, 42 + static_cast<uint64_t>(tokens)};
          const Verdict v = check_view_case(op, spec);
          EXPECT_TRUE(v.passed()) << describe(spec) << ": " << verdict_kind_name(v.kind) << " " << v.detail;
        }
      }
    }
  }
}

// The two siblings of seed bug A1 behave as their contracts say: the in-place kernel refuses a
// strided slice from T = 2 on and computes T = 1 correctly; the store kernel reads any row stride.
TEST(ViewOps, SeedBugA1SiblingsRefuseOrReadTheSlice) {
  const ViewSpec slice2{kernels::kNormRopeOp, 2, "column-slice", 96, 7};
  const Verdict inplace2 = check_view_case(slice2);
  ASSERT_TRUE(inplace2.passed()) << inplace2.detail;
  EXPECT_NE(inplace2.detail.find("refused: "), std::string::npos) << "T = 2 slice must be refused";
  EXPECT_NE(inplace2.detail.find("kv"), std::string::npos) << inplace2.detail;

  const ViewSpec slice1{kernels::kNormRopeOp, 1, "column-slice", 96, 7};
  const Verdict inplace1 = check_view_case(slice1);
  ASSERT_TRUE(inplace1.passed()) << inplace1.detail;
  EXPECT_EQ(inplace1.detail, "") << "a [1, W] slice counts as contiguous: the kernel must run";

  for (const int64_t tokens : {1, 2, 5, 8}) {
    const ViewSpec store{kernels::kNormRopeStoreOp, tokens, "column-slice", 96, 7};
    const Verdict v = check_view_case(store);
    ASSERT_TRUE(v.passed()) << v.detail;
    EXPECT_EQ(v.detail, "") << "the stride-aware kernel must read the slice, not refuse it";
  }
}

// ---- the check catches what it is there to catch ----------------------------------------------------

constexpr int64_t kW = 16;

// Seed bug A1's device code: row t read at t * W whatever the row stride, no contiguity check.
ViewOp hard_coded_row_stride_op() {
  return ViewOp{"hard_coded_row_stride", kW, {"contiguous", "row-padded", "column-slice"}, [](Tensor& x, uint64_t) {
                  const int64_t T = x.size(0);
                  const auto* in = x.data<const uint16_t>();
                  std::vector<uint8_t> out(static_cast<size_t>(T * kW * 2));
                  std::memcpy(out.data(), in, out.size());  // rows at t * W: right only when dense
                  return out;
                }};
}

TEST(ViewOps, RowStrideIgnoringKernelIsAMismatchFromTwoTokens) {
  const ViewOp op = hard_coded_row_stride_op();
  for (const int64_t tokens : {2, 3, 5, 8}) {
    for (const int64_t pad : {int64_t{1}, kW, 3 * kW}) {
      const ViewSpec spec{op.name, tokens, "column-slice", pad, 3};
      const Verdict v = check_view_case(op, spec);
      EXPECT_EQ(v.kind, VerdictKind::mismatch) << describe(spec) << ": " << v.detail;
      EXPECT_EQ(v.signature, op.name);
      EXPECT_NE(v.detail.find("column-slice"), std::string::npos) << v.detail;
      EXPECT_NE(v.detail.find("T=" + std::to_string(tokens)), std::string::npos) << v.detail;
      // Row 0 is read right; the first wrong byte is in row 1 (bf16: 2 bytes per element).
      EXPECT_NE(v.detail.find("first differing byte " + std::to_string(2 * kW)), std::string::npos) << v.detail;
    }
  }
  // The blind spot: one token never exposes it, and dense rows are read right.
  for (const int64_t pad : {int64_t{1}, kW, 3 * kW}) {
    const Verdict one = check_view_case(op, ViewSpec{op.name, 1, "column-slice", pad, 3});
    EXPECT_TRUE(one.passed()) << one.detail;
  }
  const Verdict dense = check_view_case(op, ViewSpec{op.name, 5, "contiguous", 0, 3});
  EXPECT_TRUE(dense.passed()) << dense.detail;
  const Verdict padded = check_view_case(op, ViewSpec{op.name, 2, "row-padded", 4, 3});
  EXPECT_EQ(padded.kind, VerdictKind::mismatch) << padded.detail;
}

// An in-place kernel that writes element [T - 1, W] (one past its last row's end) or only its last
// element [T - 1, W - 1]: the first is caught in every layout, the second is legal.
ViewOp last_element_writer(int64_t past) {
  return ViewOp{"last_element_writer", kW, {"contiguous", "row-padded", "column-slice", "transposed"},
                [past](Tensor& x, uint64_t) {
                  const int64_t T = x.size(0);
                  if (T > 0) {
                    auto* base = x.data<uint16_t>();
                    base[(T - 1) * x.stride(0) + (kW - 1 + past) * x.stride(1)] = 0x3F80;  // bf16 1.0
                  }
                  return logical_bytes(x);
                }};
}

TEST(ViewOps, WriteOnePastTheViewIsCaught) {
  const ViewOp past = last_element_writer(1);
  const ViewOp inside = last_element_writer(0);
  for (const std::string layout : {"contiguous", "row-padded", "column-slice", "transposed"}) {
    for (const int64_t tokens : {1, 2, 5}) {
      const int64_t pad = layout == "contiguous" ? 0 : 3;
      const ViewSpec spec{past.name, tokens, layout, pad, 9};
      const Verdict v = check_view_case(past, spec);
      EXPECT_EQ(v.kind, VerdictKind::mismatch) << describe(spec);
      EXPECT_EQ(v.detail.rfind("wrote outside its view", 0), 0u) << describe(spec) << ": " << v.detail;
      const Verdict ok = check_view_case(inside, spec);
      EXPECT_TRUE(ok.passed()) << describe(spec) << ": " << ok.detail;
    }
  }
}

// A kernel that refuses every input breaks the rule that the contiguous copy must be accepted; one
// that refuses only strided views passes.
TEST(ViewOps, RefusingTheContiguousCopyIsAMismatch) {
  const ViewOp always{"always_refuses", kW, {"contiguous", "row-padded"},
                      [](Tensor&, uint64_t) -> std::vector<uint8_t> { throw ContractError("always_refuses", "x", "never"); }};
  const Verdict v = check_view_case(always, ViewSpec{always.name, 2, "row-padded", 1, 1});
  EXPECT_EQ(v.kind, VerdictKind::mismatch);
  EXPECT_EQ(v.signature, "always_refuses");
  EXPECT_NE(v.detail.find("the contiguous input was refused"), std::string::npos) << v.detail;

  const ViewOp strict{"dense_only", kW, {"contiguous", "row-padded"}, [](Tensor& x, uint64_t) {
                        if (!x.is_contiguous()) throw ContractError("dense_only", "x", "must be contiguous");
                        return logical_bytes(x);
                      }};
  const Verdict refused = check_view_case(strict, ViewSpec{strict.name, 2, "row-padded", 1, 1});
  EXPECT_TRUE(refused.passed());
  EXPECT_EQ(refused.detail.rfind("refused: ", 0), 0u) << refused.detail;
}

TEST(ViewOps, MalformedSpecsAreInputErrors) {
  auto field_of = [](const ViewSpec& spec) -> std::string {
    try {
      check_view_case(spec);
    } catch (const InputError& e) {
      return e.field();
    }
    return "";
  };
  EXPECT_EQ(field_of(ViewSpec{"no_such_kernel", 2, "contiguous", 0, 1}), "view.op");
  EXPECT_EQ(field_of(ViewSpec{"rms_norm", 2, "diagonal", 0, 1}), "view.layout");
  EXPECT_EQ(field_of(ViewSpec{"rms_norm", -1, "contiguous", 0, 1}), "view.tokens");
  EXPECT_EQ(field_of(ViewSpec{"rms_norm", 2, "row-padded", -3, 1}), "view.pad");
}

// ---- generated cases ----------------------------------------------------------------------------------

// A few hundred generated cases; RC_PARAMS still sets the seed (and a larger max_success searches longer).
TEST(ViewOps, GeneratedCasesPass) {
  rc::detail::TestParams params = rc::detail::configuration().testParams;
  params.maxSuccess = std::max(params.maxSuccess, 300);
  rc::detail::TestMetadata metadata;
  metadata.id = "ViewOps/GeneratedCasesPass";
  metadata.description = "strided-input over gen_view_spec";
  const auto result = rc::detail::checkTestable(
      [] {
        const ViewSpec spec = *gen_view_spec();
        const Verdict v = check_view_case(spec);
        RC_TAG(spec.layout);
        if (!v.passed()) RC_FAIL(std::string(verdict_kind_name(v.kind)) + " " + v.signature + ": " + v.detail);
      },
      metadata, params);
  if (!result.template is<rc::detail::SuccessResult>()) {
    std::ostringstream ss;
    rc::detail::printResultMessage(result, ss);
    FAIL() << ss.str();
  }
}

// Every op and every one of its layouts, and T at 0, 1, 2, odd sizes and the bucket sizes.
TEST(ViewOps, GeneratedSpecsCoverEveryOpAndLayout) {
  const rc::Gen<ViewSpec> gen = gen_view_spec();
  std::set<std::pair<std::string, std::string>> seen;
  std::set<int64_t> tokens;
  for (uint64_t i = 0; i < 4000; ++i) {
    const ViewSpec spec = gen(rc::Random(i), 100).value();
    seen.insert({spec.op, spec.layout});
    tokens.insert(spec.tokens);
    if (spec.layout == "contiguous") {
      EXPECT_EQ(spec.pad, 0);
    } else if (spec.layout != "transposed") {
      EXPECT_GE(spec.pad, 1) << describe(spec);
    }
  }
  for (const ViewOp& op : view_ops()) {
    for (const std::string& layout : op.layouts) {
      EXPECT_TRUE(seen.count({op.name, layout})) << op.name << " " << layout << " never generated";
    }
  }
  for (const int64_t t : {0, 1, 2, 3, 5, 33, 4, 8, 16, 32, 64}) EXPECT_TRUE(tokens.count(t)) << "T=" << t;
}

}  // namespace
}  // namespace dsv4::props
