// Linked into every GPU test binary: when ctest runs the test under a resource spec
// (ci/gpu-runner), the GPUs it was given (CTEST_RESOURCE_GROUP_<i>_GPUS = "id:N,slots:1") become the
// process's CUDA_VISIBLE_DEVICES before anything initializes CUDA, so tests running in parallel
// never share a GPU. Outside ctest's resource allocation it changes nothing.
#include <cstdlib>
#include <string>

namespace {

std::string visible_devices_from_ctest() {
  const char* count_text = std::getenv("CTEST_RESOURCE_GROUP_COUNT");
  if (count_text == nullptr) return "";
  const int count = std::atoi(count_text);
  std::string ids;
  for (int g = 0; g < count; ++g) {
    const std::string var = "CTEST_RESOURCE_GROUP_" + std::to_string(g) + "_GPUS";
    const char* value = std::getenv(var.c_str());
    if (value == nullptr) continue;
    // "id:3,slots:1" (one entry per slot set; ';' separates several).
    std::string v(value);
    size_t pos = 0;
    while ((pos = v.find("id:", pos)) != std::string::npos) {
      pos += 3;
      const size_t end = v.find_first_of(",;", pos);
      if (!ids.empty()) ids += ",";
      ids += v.substr(pos, end == std::string::npos ? std::string::npos : end - pos);
    }
  }
  return ids;
}

const bool g_applied = [] {
  const std::string ids = visible_devices_from_ctest();
  if (!ids.empty()) setenv("CUDA_VISIBLE_DEVICES", ids.c_str(), 1);
  return true;
}();

}  // namespace
