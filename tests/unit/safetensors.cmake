# Safetensors reader/writer tests: round trips, every malformed-file rule, and a mutation fuzzer.

dsv4_add_gtest(test_safetensors
  SOURCES test_safetensors.cpp
  LIBS dsv4_checkpoint nlohmann_json::nlohmann_json
  LABELS unit
  DISCOVER)

dsv4_add_gtest(test_safetensors_fuzz
  SOURCES test_safetensors_fuzz.cpp
  LIBS dsv4_checkpoint nlohmann_json::nlohmann_json rapidcheck
  LABELS unit fuzz
  TIMEOUT 300)
# Bounded to a few seconds in CI (each case takes ~0.03 ms plain, ~0.8 ms under ASan/UBSan).
# Run the binary with RC_PARAMS="max_success=1000000" to fuzz longer.
dsv4_rapidcheck_cases(test_safetensors_fuzz 20000 2000)
