// The safetensors checkpoint format: an 8-byte little-endian header length N, N bytes of JSON
// header (an object, possibly right-padded with spaces), then the data section. Every header key
// other than "__metadata__" names a tensor: {"dtype": "F32", "shape": [..], "data_offsets":
// [begin, end]} with offsets relative to the start of the data section.
//
// The reader trusts nothing in the file: every malformed file is an InputError naming the file
// (source) and the tensor or header field (field), and no byte outside the buffer is ever read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "engine/core/dtype.h"

namespace dsv4 {

// Headers larger than this are refused before parsing: real checkpoints stay far below it, and a
// corrupt length field must not make us parse gigabytes of tensor data as JSON.
inline constexpr uint64_t kSafetensorsMaxHeaderBytes = 100'000'000;

struct SafetensorsEntry {
  std::string name;
  std::string dtype;  // the safetensors spelling, e.g. "BF16"
  std::vector<int64_t> shape;
  uint64_t begin_bytes = 0;  // relative to the data section
  uint64_t end_bytes = 0;

  uint64_t size_bytes() const { return end_bytes - begin_bytes; }
  int64_t numel() const;
};

// "F32" -> DType::f32, "F8_E4M3" -> f8_e4m3fn, "F8_E8M0" -> ue8m0, ...; nullopt for strings we
// do not accept (checkpoints store fp4 as I8/U8 with the packed shape, so there is no fp4 name).
std::optional<DType> dtype_from_safetensors(std::string_view name);
// Inverse of dtype_from_safetensors; asserts for dtypes with no safetensors name (f4_e2m1,
// f8_e4m3fnuz).
std::string_view safetensors_dtype_name(DType dtype);

// A read-only safetensors file, memory-mapped when opened from a path.
class SafetensorsFile {
 public:
  // InputError(path, field, ...) on any problem, including a missing or unreadable file.
  static SafetensorsFile open(const std::string& path);
  // Same validation over an in-memory buffer; `source_name` stands in for the path in errors.
  static SafetensorsFile from_bytes(std::string source_name, std::vector<uint8_t> bytes);

  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& other) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  ~SafetensorsFile();

  const std::string& source() const { return source_; }
  // Sorted by data offset (ties: by end offset, then name).
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  const SafetensorsEntry* find(std::string_view name) const;
  // InputError(source, name, "tensor not found") if absent.
  const SafetensorsEntry& at(std::string_view name) const;
  // The tensor's bytes; the entry must come from this file.
  std::span<const uint8_t> bytes(const SafetensorsEntry& entry) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // Layout, for tools and tests: N, 8 + N, and the whole file.
  uint64_t header_bytes() const { return header_bytes_; }
  uint64_t data_offset_bytes() const { return 8 + header_bytes_; }
  std::span<const uint8_t> file_bytes() const { return {base(), size_bytes_}; }
  bool is_mapped() const { return map_ != nullptr; }

 private:
  SafetensorsFile() = default;
  const uint8_t* base() const { return map_ != nullptr ? map_ : owned_.data(); }
  void parse();
  void release() noexcept;

  std::string source_;
  std::vector<uint8_t> owned_;     // from_bytes
  const uint8_t* map_ = nullptr;   // open: the mmap'ed file
  size_t size_bytes_ = 0;          // of the whole file
  uint64_t header_bytes_ = 0;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, size_t, std::less<>> index_;  // name -> position in entries_
  std::map<std::string, std::string> metadata_;
};

// Builds a safetensors file in memory; tensors are laid out in insertion order.
class SafetensorsWriter {
 public:
  void set_metadata(std::string key, std::string value);
  // Asserts bytes.size() == dtype_storage_bytes(dtype, numel); fp4 tensors must be added as
  // I8/U8 already packed by the caller (fp4 has no safetensors name).
  void add(std::string name, DType dtype, std::vector<int64_t> shape, std::vector<uint8_t> bytes);
  // No dtype or size checks, so tests can produce files the reader must reject.
  void add_raw(std::string name, std::string safetensors_dtype, std::vector<int64_t> shape,
               std::vector<uint8_t> bytes);
  // Header padded with spaces so the data section starts 8-byte aligned; tensors contiguous.
  std::vector<uint8_t> serialize() const;
  // The 8-byte header length and the JSON header (padded): serialize() less the tensors' bytes.
  std::vector<uint8_t> header_bytes() const;
  // Atomic: writes <path>.tmp.<pid>, fsyncs, renames over path. InputError(path, "", ...) on
  // failure, and when path exists but is not a regular file (a device, a FIFO, a directory).
  void write(const std::string& path) const;

  size_t size() const { return tensors_.size(); }

 private:
  struct Pending {
    std::string name;
    std::string dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
  };
  std::vector<Pending> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace dsv4
