#include "engine/checkpoint/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <set>
#include <utility>

#include <nlohmann/json.hpp>

#include "engine/core/error.h"
#include "engine/core/files.h"

namespace dsv4 {

namespace {

using json = nlohmann::json;

constexpr std::string_view kMetadataKey = "__metadata__";
constexpr uint64_t kInt64Max = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());

struct NamedDType {
  std::string_view name;
  DType dtype;
};

constexpr NamedDType kSafetensorsDTypes[] = {
    {"F64", DType::f64},         {"F32", DType::f32},         {"F16", DType::f16},
    {"BF16", DType::bf16},       {"F8_E4M3", DType::f8_e4m3fn}, {"F8_E5M2", DType::f8_e5m2},
    {"F8_E8M0", DType::ue8m0},   {"I8", DType::i8},           {"U8", DType::u8},
    {"I32", DType::i32},         {"I64", DType::i64},         {"BOOL", DType::boolean},
};

std::string strerror_string(int err) {
  return std::strerror(err);
}

// A JSON value as a non-negative integer; nullopt for negatives, floats and non-numbers.
// nlohmann stores non-negative literals as number_unsigned and negative ones as number_integer;
// literals beyond uint64 become floats and are refused here too.
std::optional<uint64_t> as_non_negative_integer(const json& value) {
  if (value.is_number_unsigned()) return value.get<uint64_t>();
  if (value.is_number_integer()) {
    const int64_t v = value.get<int64_t>();
    if (v >= 0) return static_cast<uint64_t>(v);
  }
  return std::nullopt;
}

std::string describe(const json& value) {
  // The type name only: dumping an attacker-sized value into a message helps nobody.
  if (value.is_number_integer()) return "the integer " + value.dump();
  return std::string("a ") + value.type_name();
}

// Parses the header JSON and notices duplicate keys, which nlohmann would otherwise resolve
// silently (last one wins) and hide a second tensor with the same name.
struct DuplicateKey {
  std::string field;  // the tensor (or "__metadata__") the duplicate sits in, or the key itself
  std::string key;
  bool top_level = false;
};

json parse_header_json(const uint8_t* first, const uint8_t* last,
                       std::optional<DuplicateKey>& duplicate) {
  struct Frame {
    bool is_object = false;
    std::set<std::string> keys;
  };
  std::vector<Frame> stack;
  std::string top_key;  // the most recent key of the top-level object
  auto callback = [&](int /*depth*/, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
        stack.push_back(Frame{true, {}});
        break;
      case json::parse_event_t::array_start:
        stack.push_back(Frame{false, {}});
        break;
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        if (!stack.empty()) stack.pop_back();
        break;
      case json::parse_event_t::key: {
        if (stack.empty() || !parsed.is_string()) break;
        const std::string& key = parsed.get_ref<const std::string&>();
        const bool top_level = stack.size() == 1;
        if (top_level) top_key = key;
        if (!stack.back().keys.insert(key).second && !duplicate) {
          duplicate = DuplicateKey{top_level ? key : top_key, key, top_level};
        }
        break;
      }
      case json::parse_event_t::value:
        break;
    }
    return true;
  };
  return json::parse(first, last, callback, /*allow_exceptions=*/true);
}

// Callers guarantee non-negative dims whose product fits int64 unless a dim is zero.
int64_t numel_of(const std::vector<int64_t>& shape) {
  // A zero dim first: the other dims' product alone may overflow (the reader allows that).
  for (int64_t d : shape) {
    if (d == 0) return 0;
  }
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

}  // namespace

int64_t SafetensorsEntry::numel() const {
  return numel_of(shape);
}

std::optional<DType> dtype_from_safetensors(std::string_view name) {
  for (const NamedDType& nd : kSafetensorsDTypes) {
    if (nd.name == name) return nd.dtype;
  }
  return std::nullopt;
}

std::string_view safetensors_dtype_name(DType dtype) {
  for (const NamedDType& nd : kSafetensorsDTypes) {
    if (nd.dtype == dtype) return nd.name;
  }
  DSV4_ASSERT(false, "dtype " + std::string(dtype_name(dtype)) +
                         " has no safetensors name (store fp4 packed as I8/U8)");
}

// ---------------------------------------------------------------------------------------------
// SafetensorsFile

SafetensorsFile::SafetensorsFile(SafetensorsFile&& other) noexcept
    : source_(std::move(other.source_)),
      owned_(std::move(other.owned_)),
      map_(std::exchange(other.map_, nullptr)),
      size_bytes_(std::exchange(other.size_bytes_, 0)),
      header_bytes_(std::exchange(other.header_bytes_, 0)),
      entries_(std::move(other.entries_)),
      index_(std::move(other.index_)),
      metadata_(std::move(other.metadata_)) {}

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& other) noexcept {
  if (this != &other) {
    release();
    source_ = std::move(other.source_);
    owned_ = std::move(other.owned_);
    map_ = std::exchange(other.map_, nullptr);
    size_bytes_ = std::exchange(other.size_bytes_, 0);
    header_bytes_ = std::exchange(other.header_bytes_, 0);
    entries_ = std::move(other.entries_);
    index_ = std::move(other.index_);
    metadata_ = std::move(other.metadata_);
  }
  return *this;
}

SafetensorsFile::~SafetensorsFile() {
  release();
}

void SafetensorsFile::release() noexcept {
  if (map_ != nullptr) {
    ::munmap(const_cast<uint8_t*>(map_), size_bytes_);
    map_ = nullptr;
  }
  size_bytes_ = 0;
}

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw InputError(path, "", "cannot open: " + strerror_string(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw InputError(path, "", "cannot stat: " + strerror_string(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw InputError(path, "", "not a regular file");
  }
  const auto size_bytes = static_cast<size_t>(st.st_size);
  if (size_bytes < 8) {
    // Checked before mmap, which refuses zero-length mappings.
    ::close(fd);
    throw InputError(path, "header length",
                     "file is " + std::to_string(size_bytes) +
                         " bytes, shorter than the 8-byte header length field");
  }
  void* map = ::mmap(nullptr, size_bytes, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_err = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (map == MAP_FAILED) throw InputError(path, "", "cannot mmap: " + strerror_string(map_err));

  SafetensorsFile file;  // owns the mapping from here on, so a parse error unmaps it
  file.source_ = path;
  file.map_ = static_cast<const uint8_t*>(map);
  file.size_bytes_ = size_bytes;
  file.parse();
  return file;
}

SafetensorsFile SafetensorsFile::from_bytes(std::string source_name, std::vector<uint8_t> bytes) {
  SafetensorsFile file;
  file.source_ = std::move(source_name);
  file.owned_ = std::move(bytes);
  file.size_bytes_ = file.owned_.size();
  file.parse();
  return file;
}

void SafetensorsFile::parse() {
  const std::string& src = source_;
  const uint8_t* data = base();
  if (size_bytes_ < 8) {
    throw InputError(src, "header length",
                     "file is " + std::to_string(size_bytes_) +
                         " bytes, shorter than the 8-byte header length field");
  }
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];  // little-endian on any host
  if (n > kSafetensorsMaxHeaderBytes) {
    throw InputError(src, "header length",
                     "header length " + std::to_string(n) + " exceeds the limit of " +
                         std::to_string(kSafetensorsMaxHeaderBytes) + " bytes");
  }
  if (n > size_bytes_ - 8) {
    throw InputError(src, "header length",
                     "header length " + std::to_string(n) + " runs past the end of the file (" +
                         std::to_string(size_bytes_) + " bytes)");
  }
  header_bytes_ = n;
  const uint64_t data_size_bytes = size_bytes_ - 8 - n;

  // nlohmann treats a NUL byte as the end of input, which would silently ignore whatever
  // follows it; NUL is never valid in JSON text (inside strings it must be escaped).
  if (std::memchr(data + 8, 0, n) != nullptr) {
    throw InputError(src, "header", "header is not valid UTF-8 JSON: it contains a NUL byte");
  }
  std::optional<DuplicateKey> duplicate;
  json header;
  try {
    header = parse_header_json(data + 8, data + 8 + n, duplicate);
  } catch (const json::exception& e) {
    // nlohmann also rejects invalid UTF-8 inside strings here.
    throw InputError(src, "header", std::string("header is not valid UTF-8 JSON: ") + e.what());
  }
  if (!header.is_object()) {
    throw InputError(src, "header", "header is " + describe(header) + ", not a JSON object");
  }
  if (duplicate) {
    if (duplicate->top_level) {
      throw InputError(src, duplicate->field, "duplicate tensor name in the header");
    }
    throw InputError(src, duplicate->field, "duplicate key '" + duplicate->key + "'");
  }

  std::vector<SafetensorsEntry> entries;
  entries.reserve(header.size());
  for (const auto& [name, value] : header.items()) {
    if (name == kMetadataKey) {
      if (!value.is_object()) {
        throw InputError(src, std::string(kMetadataKey),
                         "is " + describe(value) + ", not an object of strings");
      }
      for (const auto& [key, text] : value.items()) {
        if (!text.is_string()) {
          throw InputError(src, std::string(kMetadataKey),
                           "value of '" + key + "' is " + describe(text) + ", not a string");
        }
        metadata_.emplace(key, text.get<std::string>());
      }
      continue;
    }
    if (name.empty()) throw InputError(src, "header", "a tensor has an empty name");
    if (!value.is_object()) {
      throw InputError(src, name, "tensor entry is " + describe(value) + ", not an object");
    }

    SafetensorsEntry entry;
    entry.name = name;

    const auto dtype_it = value.find("dtype");
    if (dtype_it == value.end()) throw InputError(src, name, "missing 'dtype'");
    if (!dtype_it->is_string()) {
      throw InputError(src, name, "'dtype' is " + describe(*dtype_it) + ", not a string");
    }
    entry.dtype = dtype_it->get<std::string>();
    const std::optional<DType> dtype = dtype_from_safetensors(entry.dtype);
    if (!dtype) throw InputError(src, name, "unknown dtype '" + entry.dtype + "'");

    const auto shape_it = value.find("shape");
    if (shape_it == value.end()) throw InputError(src, name, "missing 'shape'");
    if (!shape_it->is_array()) {
      throw InputError(src, name, "'shape' is " + describe(*shape_it) + ", not an array");
    }
    bool has_zero_dim = false;
    for (size_t i = 0; i < shape_it->size(); ++i) {
      const json& dim = (*shape_it)[i];
      const std::optional<uint64_t> d = as_non_negative_integer(dim);
      if (!d) {
        throw InputError(src, name,
                         "shape[" + std::to_string(i) + "] is " + describe(dim) +
                             ", not a non-negative integer");
      }
      if (*d > kInt64Max) {
        throw InputError(src, name, "shape[" + std::to_string(i) + "] is too large");
      }
      has_zero_dim = has_zero_dim || *d == 0;
      entry.shape.push_back(static_cast<int64_t>(*d));
    }
    // numel and bytes in uint64 with overflow checks; a zero dim makes the tensor empty even when
    // the other dims alone would overflow.
    uint64_t expected_bytes = 0;
    if (!has_zero_dim) {
      uint64_t numel = 1;
      for (int64_t d : entry.shape) {
        if (__builtin_mul_overflow(numel, static_cast<uint64_t>(d), &numel) || numel > kInt64Max) {
          throw InputError(src, name, "element count overflows int64");
        }
      }
      const auto element_bytes = static_cast<uint64_t>(dtype_bits(*dtype) / 8);
      if (__builtin_mul_overflow(numel, element_bytes, &expected_bytes) ||
          expected_bytes > kInt64Max) {
        throw InputError(src, name, "byte size (element count x element size) overflows int64");
      }
    }

    const auto offsets_it = value.find("data_offsets");
    if (offsets_it == value.end()) throw InputError(src, name, "missing 'data_offsets'");
    if (!offsets_it->is_array() || offsets_it->size() != 2) {
      throw InputError(src, name, "'data_offsets' must be an array [begin, end]");
    }
    const std::optional<uint64_t> begin = as_non_negative_integer((*offsets_it)[0]);
    const std::optional<uint64_t> end = as_non_negative_integer((*offsets_it)[1]);
    if (!begin || !end) {
      throw InputError(src, name, "'data_offsets' must hold two non-negative integers");
    }
    if (*begin > *end) {
      throw InputError(src, name,
                       "data_offsets begin " + std::to_string(*begin) + " is after end " +
                           std::to_string(*end));
    }
    if (*end > data_size_bytes) {
      throw InputError(src, name,
                       "data_offsets end " + std::to_string(*end) +
                           " is past the end of the data section (" +
                           std::to_string(data_size_bytes) + " bytes)");
    }
    if (*end - *begin != expected_bytes) {
      throw InputError(src, name,
                       "data_offsets span " + std::to_string(*end - *begin) + " bytes but " +
                           entry.dtype + " with this shape needs " +
                           std::to_string(expected_bytes));
    }
    entry.begin_bytes = *begin;
    entry.end_bytes = *end;
    entries.push_back(std::move(entry));
  }

  // The spec requires the tensors to tile the data section exactly: no overlaps, no gaps, no
  // trailing bytes. Zero-size tensors must sit on a boundary between tensors.
  std::sort(entries.begin(), entries.end(), [](const auto& a, const auto& b) {
    if (a.begin_bytes != b.begin_bytes) return a.begin_bytes < b.begin_bytes;
    if (a.end_bytes != b.end_bytes) return a.end_bytes < b.end_bytes;
    return a.name < b.name;
  });
  uint64_t cursor_bytes = 0;
  const SafetensorsEntry* previous = nullptr;
  for (const SafetensorsEntry& e : entries) {
    if (e.begin_bytes < cursor_bytes) {
      throw InputError(src, e.name,
                       "data_offsets [" + std::to_string(e.begin_bytes) + ", " +
                           std::to_string(e.end_bytes) + ") overlap tensor '" + previous->name +
                           "'");
    }
    if (e.begin_bytes > cursor_bytes) {
      throw InputError(src, e.name,
                       "gap of " + std::to_string(e.begin_bytes - cursor_bytes) +
                           " bytes in the data section before this tensor");
    }
    cursor_bytes = e.end_bytes;
    previous = &e;
  }
  if (cursor_bytes != data_size_bytes) {
    throw InputError(src, previous != nullptr ? previous->name : "data section",
                     std::to_string(data_size_bytes - cursor_bytes) +
                         " trailing bytes in the data section not covered by any tensor");
  }

  entries_ = std::move(entries);
  for (size_t i = 0; i < entries_.size(); ++i) index_.emplace(entries_[i].name, i);
}

const SafetensorsEntry* SafetensorsFile::find(std::string_view name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &entries_[it->second];
}

const SafetensorsEntry& SafetensorsFile::at(std::string_view name) const {
  const SafetensorsEntry* entry = find(name);
  if (entry == nullptr) throw InputError(source_, std::string(name), "tensor not found");
  return *entry;
}

std::span<const uint8_t> SafetensorsFile::bytes(const SafetensorsEntry& entry) const {
  const uint64_t data_size_bytes = size_bytes_ - data_offset_bytes();
  DSV4_ASSERT(entry.begin_bytes <= entry.end_bytes && entry.end_bytes <= data_size_bytes,
              "entry '" + entry.name + "' does not belong to " + source_);
  return {base() + data_offset_bytes() + entry.begin_bytes, entry.size_bytes()};
}

// ---------------------------------------------------------------------------------------------
// SafetensorsWriter

namespace {

void assert_valid_name(const std::string& name, const std::vector<int64_t>& shape) {
  DSV4_ASSERT(!name.empty(), "tensor names must be non-empty");
  DSV4_ASSERT(name != kMetadataKey, "'__metadata__' is reserved");
  for (int64_t d : shape) DSV4_ASSERT(d >= 0, "negative dim in tensor '" + name + "'");
  // Header keys must be valid UTF-8 or the header could not be written.
  try {
    (void)json(name).dump();
  } catch (const json::exception&) {
    DSV4_ASSERT(false, "tensor name is not valid UTF-8");
  }
}

}  // namespace

void SafetensorsWriter::set_metadata(std::string key, std::string value) {
  metadata_[std::move(key)] = std::move(value);
}

void SafetensorsWriter::add(std::string name, DType dtype, std::vector<int64_t> shape,
                            std::vector<uint8_t> bytes) {
  const std::string_view st_name = safetensors_dtype_name(dtype);  // asserts for fp4
  for (int64_t d : shape) DSV4_ASSERT(d >= 0, "negative dim in tensor '" + name + "'");
  const int64_t numel = numel_of(shape);
  DSV4_ASSERT(static_cast<int64_t>(bytes.size()) == dtype_storage_bytes(dtype, numel),
              "tensor '" + name + "' has " + std::to_string(bytes.size()) + " bytes, expected " +
                  std::to_string(dtype_storage_bytes(dtype, numel)));
  add_raw(std::move(name), std::string(st_name), std::move(shape), std::move(bytes));
}

void SafetensorsWriter::add_raw(std::string name, std::string safetensors_dtype,
                                std::vector<int64_t> shape, std::vector<uint8_t> bytes) {
  assert_valid_name(name, shape);
  for (const Pending& t : tensors_) {
    DSV4_ASSERT(t.name != name, "duplicate tensor '" + name + "'");
  }
  tensors_.push_back(Pending{std::move(name), std::move(safetensors_dtype), std::move(shape),
                             std::move(bytes)});
}

std::vector<uint8_t> SafetensorsWriter::header_bytes() const {
  // ordered_json keeps __metadata__ first and the tensors in insertion order, for readability.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata_.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [key, value] : metadata_) meta[key] = value;
    header[std::string(kMetadataKey)] = std::move(meta);
  }
  uint64_t offset_bytes = 0;
  for (const Pending& t : tensors_) {
    const uint64_t end_bytes = offset_bytes + t.bytes.size();
    header[t.name] = {{"dtype", t.dtype},
                      {"shape", t.shape},
                      {"data_offsets", {offset_bytes, end_bytes}}};
    offset_bytes = end_bytes;
  }
  std::string text = header.dump();
  // Pad so that 8 + N is a multiple of 8: the data section then starts 8-byte aligned in the
  // file (and in an mmap), so f64/i64 tensors can be read in place.
  text.append((8 - text.size() % 8) % 8, ' ');

  std::vector<uint8_t> out;
  out.reserve(8 + text.size());
  const uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(n >> (8 * i)));
  out.insert(out.end(), text.begin(), text.end());
  return out;
}

std::vector<uint8_t> SafetensorsWriter::serialize() const {
  std::vector<uint8_t> out = header_bytes();
  for (const Pending& t : tensors_) out.insert(out.end(), t.bytes.begin(), t.bytes.end());
  return out;
}

void SafetensorsWriter::write(const std::string& path) const {
  require_regular_target(path);
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const auto fail = [&](const std::string& what, int err, int fd) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw InputError(path, "", what + ": " + strerror_string(err));
  };

  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail("cannot create " + tmp, errno, -1);
  // The header, then each tensor's bytes in place: no second copy of the checkpoint in memory.
  const auto write_all = [&](const std::vector<uint8_t>& data) {
    size_t done_bytes = 0;
    while (done_bytes < data.size()) {
      const ssize_t w = ::write(fd, data.data() + done_bytes, data.size() - done_bytes);
      if (w < 0) {
        if (errno == EINTR) continue;
        fail("cannot write " + tmp, errno, fd);
      }
      done_bytes += static_cast<size_t>(w);
    }
  };
  write_all(header_bytes());
  for (const Pending& t : tensors_) write_all(t.bytes);
  if (::fsync(fd) != 0) fail("cannot fsync " + tmp, errno, fd);
  if (::close(fd) != 0) fail("cannot close " + tmp, errno, -1);
  if (::rename(tmp.c_str(), path.c_str()) != 0) fail("cannot rename " + tmp, errno, -1);

  // Make the rename itself durable; failing here leaves a complete file, so it is not an error.
  const size_t slash = path.find_last_of('/');
  const std::string dir =
      slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    ::fsync(dir_fd);
    ::close(dir_fd);
  }
}

}  // namespace dsv4
