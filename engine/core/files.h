// File-system checks shared by the writers that replace a file atomically (a temporary file, then
// rename): the safetensors writer and the case-file writer.
#pragma once

#include <sys/stat.h>

#include <string>

#include "engine/core/error.h"

namespace dsv4 {

// Throws InputError(path) when something other than a regular file is at `path`: the rename would
// swap it for a regular file (as root, `--out /dev/null` would replace the device) or fail late.
inline void require_regular_target(const std::string& path) {
  struct stat existing{};
  if (::stat(path.c_str(), &existing) == 0 && !S_ISREG(existing.st_mode)) {
    throw InputError(path, "", "exists and is not a regular file; write to a new or regular file");
  }
}

}  // namespace dsv4
