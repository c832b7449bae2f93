// Configs shipped with the harness: the released shapes (flash, pro; too large to run on a CPU),
// `small` (Flash's per-layer shapes, 8 layers), `tiny` (the scalar-reference size) and `micro`
// (the smallest config with every structural feature, for properties that run many cases).
#pragma once

#include <string>
#include <vector>

namespace dsv4 {

// The preset's JSON text, or nullptr if `name` is not a preset.
const std::string* find_preset(const std::string& name);
std::vector<std::string> preset_list();
std::string preset_names();  // "flash, pro, small, tiny, micro"

}  // namespace dsv4
