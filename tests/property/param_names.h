// ctest names for tests parametrized by suite or fault name ("pp-equivalence" -> pp_equivalence).
#pragma once

#include <gtest/gtest.h>

#include <string>

namespace dsv4::props {

inline std::string param_test_name(const ::testing::TestParamInfo<std::string>& info) {
  std::string n = info.param;
  for (char& c : n) {
    if (c == '-') c = '_';
  }
  return n;
}

}  // namespace dsv4::props
