// The reference's one data type: a dense row-major f32 matrix (a vector is one row). Plain on
// purpose: every loop in reference/ reads like the formula it implements.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/core/error.h"

namespace dsv4::ref {

struct Mat {
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<float> data;

  Mat() = default;
  Mat(int64_t r, int64_t c, float fill = 0.0f) : rows(r), cols(c), data(static_cast<size_t>(r * c), fill) {}

  float* row(int64_t r) { return data.data() + r * cols; }
  const float* row(int64_t r) const { return data.data() + r * cols; }
  float& at(int64_t r, int64_t c) { return data[static_cast<size_t>(r * cols + c)]; }
  float at(int64_t r, int64_t c) const { return data[static_cast<size_t>(r * cols + c)]; }
  int64_t size() const { return rows * cols; }
};

// Rows [first, first + count) as a new matrix.
inline Mat rows_of(const Mat& m, int64_t first, int64_t count) {
  DSV4_ASSERT(first >= 0 && first + count <= m.rows, "rows_of out of range");
  Mat out(count, m.cols);
  std::copy(m.row(first), m.row(first) + count * m.cols, out.data.begin());
  return out;
}

// Columns [first, first + count) of every row.
inline Mat cols_of(const Mat& m, int64_t first, int64_t count) {
  DSV4_ASSERT(first >= 0 && first + count <= m.cols, "cols_of out of range");
  Mat out(m.rows, count);
  for (int64_t r = 0; r < m.rows; ++r) std::copy(m.row(r) + first, m.row(r) + first + count, out.row(r));
  return out;
}

}  // namespace dsv4::ref

namespace dsv4::ref {

// Sum of a[i] * b[i]: each product in fp32, accumulated in fp64 over eight interleaved partial sums
// (a fixed order, so the result is bitwise reproducible), rounded once to fp32 by the caller.
inline double dot(const float* a, const float* b, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += static_cast<double>(a[i + j] * b[i + j]);
  }
  for (; i < n; ++i) acc[i % 8] += static_cast<double>(a[i] * b[i]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

}  // namespace dsv4::ref
