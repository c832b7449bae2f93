# Narrow number formats: engine/core/formats.h checked against reference/formats_spec.h.
dsv4_add_gtest(test_formats DISCOVER
  SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/test_formats.cpp
  LIBS dsv4_core dsv4_reference
  LABELS unit)

# Every f32 input through every encoder: one ctest test per (format, sign, half of the magnitude
# range), about 2.5 s each at -O2. Labelled `exhaustive` so sanitizer runs can skip them with
# -LE exhaustive.
dsv4_add_gtest(test_formats_exhaustive DISCOVER TIMEOUT 300
  SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/test_formats_exhaustive.cpp
  LIBS dsv4_core dsv4_reference
  LABELS unit exhaustive)
