#include "properties/case_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <vector>

#include "engine/core/error.h"
#include "engine/core/files.h"
#include "properties/scenario_json.h"

namespace dsv4::props {

namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;
using namespace json_fields;

// scenario and verdict are read through their own entry points so that their tables stay in
// scenario_json.cpp; the paths passed down keep errors naming "$.scenario...".
const std::vector<Field<CaseFile>>& case_table() {
  static const std::vector<Field<CaseFile>> table = {
      member("version", &CaseFile::version, /*required=*/true),
      member("property", &CaseFile::property, /*required=*/true),
      Field<CaseFile>{"scenario", /*required=*/true,
                      [](const CaseFile& c, json& out) { out["scenario"] = scenario_to_json(c.scenario); },
                      [](const json& v, const std::string& path, const std::string& source, CaseFile& c) {
                        c.scenario = scenario_from_json(v, source, path);
                      }},
      Field<CaseFile>{"verdict", /*required=*/true,
                      [](const CaseFile& c, json& out) { out["verdict"] = verdict_to_json(c.verdict); },
                      [](const json& v, const std::string& path, const std::string& source, CaseFile& c) {
                        c.verdict = verdict_from_json(v, source, path);
                      }},
      member("engine_commit", &CaseFile::engine_commit),
      member("backend", &CaseFile::backend),
      member("recorded_at", &CaseFile::recorded_at),
      member("shrink_steps", &CaseFile::shrink_steps),
  };
  return table;
}

std::string errno_text(int err) { return std::strerror(err); }

// Rejects a key given twice in one object while parsing: nlohmann keeps the last silently, and a
// hand-edited case would then replay something other than what its reader sees first.
class DuplicateKeyCheck {
 public:
  explicit DuplicateKeyCheck(std::string source) : source_(std::move(source)) {}

  bool operator()(int /*depth*/, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start: open(true); break;
      case json::parse_event_t::array_start: open(false); break;
      case json::parse_event_t::key: {
        Frame& top = stack_.back();
        top.key = parsed.get<std::string>();
        if (!top.keys.insert(top.key).second) {
          throw InputError(source_, key_path(top.path, top.key), "key given twice in one object");
        }
        break;
      }
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        stack_.pop_back();
        element_done();
        break;
      case json::parse_event_t::value: element_done(); break;
    }
    return true;
  }

 private:
  struct Frame {
    bool object;
    std::string path;
    std::set<std::string> keys;
    std::string key;   // objects: the key of the value being read
    size_t index = 0;  // arrays: the index of the value being read
  };
  void open(bool object) {
    std::string path = "$";
    if (!stack_.empty()) {
      const Frame& top = stack_.back();
      path = top.object ? key_path(top.path, top.key) : index_path(top.path, top.index);
    }
    stack_.push_back(Frame{object, std::move(path), {}, {}, 0});
  }
  void element_done() {
    if (!stack_.empty() && !stack_.back().object) ++stack_.back().index;
  }
  std::string source_;
  std::vector<Frame> stack_;
};

std::string hex16(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

// The property names the file; anything that could leave the directory or confuse a shell is
// replaced, so the name is always one plain path component.
std::string file_stem(const std::string& property) {
  std::string out;
  for (char ch : property) {
    const bool plain = std::isalnum(static_cast<unsigned char>(ch)) || ch == '-' || ch == '_' || ch == '.';
    out += plain ? ch : '_';
  }
  if (out.empty() || out[0] == '.') out = "case" + out;
  return out;
}

void write_all(int fd, const std::string& text, const std::string& path) {
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw InputError(path, "", "cannot write the case file: " + errno_text(errno));
    done += static_cast<size_t>(n);
  }
}

// Makes the rename itself durable: without it a power loss may forget the new directory entry.
void fsync_directory(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw InputError(dir.string(), "", "cannot open the case directory to sync it: " + errno_text(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) throw InputError(dir.string(), "", "cannot sync the case directory: " + errno_text(err));
}

std::string dump_file(const json& j) {
  // replace: a stray non-UTF-8 byte in a verdict's detail must not lose the whole case.
  return j.dump(2, ' ', false, json::error_handler_t::replace) + "\n";
}

}  // namespace

uint64_t fnv1a_64(std::string_view bytes, uint64_t hash) {
  for (unsigned char b : bytes) {
    hash ^= b;
    hash *= 0x100000001b3ULL;
  }
  return hash;
}

nlohmann::json case_to_json(const CaseFile& c) { return write_object(c, case_table()); }

CaseFile case_from_json(const nlohmann::json& j, const std::string& source) {
  if (!j.is_object()) throw InputError(source, "$", "a case file must be a JSON object, got " + describe(j));
  const std::string reads = "this build reads case format version " + std::to_string(kCaseFormatVersion);
  const auto version = j.find("version");
  if (version == j.end()) throw InputError(source, "$.version", "missing: a case file must name its format (" + reads + ")");
  if (!version->is_number_integer() || version->get<int64_t>() != kCaseFormatVersion) {
    throw InputError(source, "$.version", "case format version " + version->dump() + " is not readable here (" + reads + ")");
  }
  CaseFile c;
  read_object(j, "$", source, case_table(), c);
  if (c.shrink_steps < 0) throw InputError(source, "$.shrink_steps", "must not be negative, got " + std::to_string(c.shrink_steps));
  return c;
}

CaseFile read_case_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(path, "", "cannot open the case file: " + errno_text(errno));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) throw InputError(path, "", "cannot read the case file");
  json j;
  try {
    j = json::parse(text.str(), DuplicateKeyCheck(path));
  } catch (const json::parse_error& e) {
    // nlohmann's message also gives line and column; the byte offset is what a truncation shows.
    std::string what = e.what();
    const auto tag = what.find("] ");
    if (what.rfind("[json.exception", 0) == 0 && tag != std::string::npos) what = what.substr(tag + 2);
    throw InputError(path, "", "not valid JSON at byte offset " + std::to_string(e.byte) +
                                   " (a truncated or corrupt file?): " + what);
  }
  return case_from_json(j, path);
}

std::string case_file_name(const CaseFile& c) {
  // The canonical dump (sorted keys, no spaces) of the scenario, then the verdict's kind and
  // signature; '\0' separates them, and neither JSON text nor a kind name contains one.
  uint64_t h = fnv1a_64(scenario_to_json(c.scenario).dump(-1, ' ', false, json::error_handler_t::replace));
  h = fnv1a_64(std::string_view("\0", 1), h);
  h = fnv1a_64(verdict_kind_name(c.verdict.kind), h);
  h = fnv1a_64(std::string_view("\0", 1), h);
  h = fnv1a_64(c.verdict.signature, h);
  return file_stem(c.property) + "-" + hex16(h) + ".json";
}

void write_case_file_at(const std::string& path, const CaseFile& c) {
  require_regular_target(path);
  const fs::path target(path);
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw InputError(dir.string(), "", "cannot create the case directory: " + ec.message());
  static std::atomic<uint64_t> counter{0};
  const fs::path temp = dir / ("." + target.filename().string() + ".tmp-" + std::to_string(::getpid()) + "-" +
                               std::to_string(counter++));
  const std::string text = dump_file(case_to_json(c));
  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) throw InputError(temp.string(), "", "cannot create the temporary case file: " + errno_text(errno));
  bool fd_open = true;  // close once only: a second close could hit a descriptor another thread reused
  try {
    write_all(fd, text, temp.string());
    if (::fsync(fd) != 0) throw InputError(temp.string(), "", "cannot sync the case file: " + errno_text(errno));
    fd_open = false;
    if (::close(fd) != 0) throw InputError(temp.string(), "", "cannot close the case file: " + errno_text(errno));
  } catch (...) {
    if (fd_open) ::close(fd);
    ::unlink(temp.c_str());
    throw;
  }
  if (::rename(temp.c_str(), target.c_str()) != 0) {
    const int err = errno;
    ::unlink(temp.c_str());
    throw InputError(target.string(), "", "cannot move the case file into place: " + errno_text(err));
  }
  fsync_directory(dir);
}

WrittenCase write_case_file(const std::string& directory, const CaseFile& c) {
  const fs::path dir = directory.empty() ? fs::path(".") : fs::path(directory);
  const fs::path target = dir / case_file_name(c);
  // Only a regular file counts as the case being recorded; anything else there makes rename fail.
  std::error_code ec;
  if (fs::is_regular_file(target, ec)) return {target.string(), false};
  write_case_file_at(target.string(), c);
  return {target.string(), true};
}

std::string utc_now_iso8601() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  ::gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

}  // namespace dsv4::props
