// The recorder's case file: one failing Scenario with its Verdict and where it was found, as a
// versioned JSON file (docs/design.md: failure -> case file -> replay / shrink / ctest). Files are
// named by their content, so the corpus never holds the same failure twice, and written atomically,
// so a crash mid-write never leaves a truncated case behind.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "properties/scenario.h"
#include "properties/verdict.h"

namespace dsv4::props {

inline constexpr int kCaseFormatVersion = 1;

struct CaseFile {
  int version = kCaseFormatVersion;
  std::string property;       // the suite that failed
  Scenario scenario;
  Verdict verdict;
  std::string engine_commit;  // git describe of the engine that found it ("unknown" if not known)
  std::string backend;        // "sim" | "cuda"
  std::string recorded_at;    // UTC, ISO 8601
  int64_t shrink_steps = 0;   // how many smaller failing scenarios the shrinker went through
};

// Required keys: version, property, scenario, verdict; engine_commit, backend, recorded_at and
// shrink_steps default to the struct's values when absent.
nlohmann::json case_to_json(const CaseFile& c);
// A missing or unknown "version" is refused (naming it and the version this build reads) before any
// other key is looked at, so that a file of another format is never misread.
CaseFile case_from_json(const nlohmann::json& j, const std::string& source);
// InputError with the path as source and the JSON path as field; invalid JSON (a truncated file)
// names the byte offset, and a key given twice in one object is refused.
CaseFile read_case_file(const std::string& path);

// Writes `c` to "<directory>/<property>-<16 hex digits>.json", the digits a hash of the scenario's
// JSON and the verdict's kind and signature, atomically (temporary file in the same directory,
// fsync, rename, fsync of the directory). When that file exists already, nothing is written and
// `written` is false. Creates the directory and its parents. I/O failures are InputErrors naming
// the path (the corpus directory is the user's choice).
struct WrittenCase {
  std::string path;
  bool written;
};
WrittenCase write_case_file(const std::string& directory, const CaseFile& c);

// Writes `c` to exactly `path` (replacing a regular file there; anything else at `path` is an
// InputError), atomically as above: `dsv4h shrink --out`.
void write_case_file_at(const std::string& path, const CaseFile& c);

// The file name write_case_file uses for `c` (without the directory).
std::string case_file_name(const CaseFile& c);

// FNV-1a, 64 bits: stable across runs, builds and platforms, unlike std::hash.
uint64_t fnv1a_64(std::string_view bytes, uint64_t hash = 0xcbf29ce484222325ULL);

// The current time in UTC, e.g. "2025-01-31T12:34:56Z".
std::string utc_now_iso8601();

}  // namespace dsv4::props
