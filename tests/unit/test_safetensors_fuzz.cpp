// Property-based fuzzing of the safetensors reader: valid files from random tensors, then random
// mutations. The reader must either accept the result with entries that lie inside the buffer and
// match numel x element size, or throw InputError; anything else (another exception, a crash, an
// out-of-bounds read under ASan) fails. The case count comes from RC_PARAMS (set in
// safetensors.cmake).
#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "engine/checkpoint/safetensors.h"
#include "engine/core/error.h"

namespace dsv4 {
namespace {

constexpr const char* kSource = "fuzz.safetensors";

const std::vector<std::string> kDTypeNames = {"F64",     "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2",
                                              "F8_E8M0", "I8",  "U8",  "I32",  "I64",     "BOOL"};

struct GeneratedTensor {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

struct GeneratedFile {
  std::vector<GeneratedTensor> tensors;
  std::vector<uint8_t> bytes;
};

// A valid file: 0-5 random tensors (ranks 0-3, dims 0-4, any accepted dtype), maybe metadata.
GeneratedFile generate_valid_file() {
  GeneratedFile out;
  SafetensorsWriter w;
  const int count = *rc::gen::inRange(0, 6);
  for (int i = 0; i < count; ++i) {
    GeneratedTensor t;
    t.dtype = *rc::gen::elementOf(kDTypeNames);
    const DType dtype = *dtype_from_safetensors(t.dtype);
    t.shape = *rc::gen::container<std::vector<int64_t>>(
        static_cast<size_t>(*rc::gen::inRange(0, 4)), rc::gen::inRange<int64_t>(0, 5));
    int64_t numel = 1;
    for (int64_t d : t.shape) numel *= d;
    // Content does not matter to the reader; a cheap pattern keeps generation fast.
    t.bytes.resize(static_cast<size_t>(dtype_storage_bytes(dtype, numel)));
    for (size_t k = 0; k < t.bytes.size(); ++k) t.bytes[k] = static_cast<uint8_t>(k * 37 + i);
    // Names: short, unique, sometimes dotted like real checkpoints.
    t.name = "layers." + std::to_string(i) + (*rc::gen::arbitrary<bool>() ? ".w" : "");
    w.add(t.name, dtype, t.shape, t.bytes);
    out.tensors.push_back(std::move(t));
  }
  if (*rc::gen::arbitrary<bool>()) w.set_metadata("format", "pt");
  out.bytes = w.serialize();
  return out;
}

uint64_t read_header_length(const std::vector<uint8_t>& b) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | b[static_cast<size_t>(i)];
  return n;
}

void write_header_length(std::vector<uint8_t>& b, uint64_t n) {
  for (int i = 0; i < 8; ++i) b[static_cast<size_t>(i)] = static_cast<uint8_t>(n >> (8 * i));
}

// [8, header end) clamped to the buffer; empty if there is no length field.
std::pair<size_t, size_t> header_range(const std::vector<uint8_t>& b) {
  if (b.size() < 8) return {b.size(), b.size()};
  const uint64_t n = read_header_length(b);
  const uint64_t end = std::min<uint64_t>(8 + std::min<uint64_t>(n, b.size()), b.size());
  return {8, static_cast<size_t>(end)};
}

// Inserts `text` at `pos`; with `fix_length` the header length grows to match when `pos` lies in
// the header, so the JSON change is what the reader sees rather than a broken length.
void splice(std::vector<uint8_t>& b, size_t pos, const std::string& text, size_t erase_bytes,
            bool fix_length) {
  pos = std::min(pos, b.size());
  erase_bytes = std::min(erase_bytes, b.size() - pos);
  const auto [hb, he] = header_range(b);
  b.erase(b.begin() + static_cast<std::ptrdiff_t>(pos),
          b.begin() + static_cast<std::ptrdiff_t>(pos + erase_bytes));
  b.insert(b.begin() + static_cast<std::ptrdiff_t>(pos), text.begin(), text.end());
  if (fix_length && b.size() >= 8 && pos >= hb && pos <= he) {
    write_header_length(b, read_header_length(b) - erase_bytes + text.size());
  }
}

const std::vector<std::string> kJsonFragments = {
    "{", "}", "[", "]", ",", ":", "\"", " ", "null", "true", "-1", "0", "1.5", "1e400",
    "18446744073709551615", "18446744073709551616", "9223372036854775808", "4294967296",
    "\"dtype\"", "\"shape\"", "\"data_offsets\"", "\"F32\"", "\"F4\"", "\"BOOL\"", "\"\"",
    "\"__metadata__\"", "\"__metadata__\":{\"a\":1},", "\"__metadata__\":[],",
    "\"layers.0\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},",
    "\"layers.0.w\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]},",
    "\"z\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[0,8]},",
    "\"shape\":[-3],", "\"data_offsets\":[5,2],", "[0,0]", "[1,2,3]", "{}", "[]",
    "\"\\u0000\"", "\"\\ud800\"", "\xff", "\xc3", "\xe2\x82", "\x00", "/*", "\t\n",
};

const std::vector<uint64_t> kInterestingLengths = {
    0, 1, 2, 7, 8, 100'000'000, 100'000'001, uint64_t{1} << 32, uint64_t{1} << 63, ~uint64_t{0}};

const std::vector<std::string> kInterestingNumbers = {
    "0", "1", "-1", "-0", "2", "3", "7", "8", "255", "4294967296", "9223372036854775807",
    "9223372036854775808", "18446744073709551615", "18446744073709551616", "1.0", "1e2", "00"};

void mutate(std::vector<uint8_t>& b) {
  const int kind = *rc::gen::inRange(0, 8);
  switch (kind) {
    case 0: {  // flip one byte
      if (b.empty()) return;
      const auto pos = *rc::gen::inRange<size_t>(0, b.size());
      b[pos] ^= static_cast<uint8_t>(*rc::gen::inRange(1, 256));
      return;
    }
    case 1: {  // truncate
      b.resize(*rc::gen::inRange<size_t>(0, b.size() + 1));
      return;
    }
    case 2: {  // extend with junk, spaces or zeros
      const auto extra = *rc::gen::inRange<size_t>(1, 17);
      const uint8_t fill = *rc::gen::elementOf(std::vector<uint8_t>{0, ' ', 0xAB});
      b.insert(b.end(), extra, fill);
      return;
    }
    case 3: {  // overwrite the header length field
      if (b.size() < 8) return;
      const uint64_t n = read_header_length(b);
      const uint64_t size = b.size();
      const std::vector<uint64_t> near = {n - 1, n + 1, size - 8, size - 7, size, n + 8, n / 2};
      const int choice = *rc::gen::inRange(0, 3);
      if (choice == 0) {
        write_header_length(b, *rc::gen::elementOf(near));
      } else if (choice == 1) {
        write_header_length(b, *rc::gen::elementOf(kInterestingLengths));
      } else {
        write_header_length(b, *rc::gen::arbitrary<uint64_t>());
      }
      return;
    }
    case 4:
    case 5: {  // splice (kind 4) or overwrite (kind 5) a JSON fragment inside the header
      const auto [hb, he] = header_range(b);
      const auto pos = *rc::gen::inRange<size_t>(hb, he + 1);
      const size_t erase_bytes = kind == 5 ? *rc::gen::inRange<size_t>(1, 12) : 0;
      splice(b, pos, *rc::gen::elementOf(kJsonFragments), erase_bytes,
             /*fix_length=*/*rc::gen::inRange(0, 4) != 0);
      return;
    }
    case 6:
    case 7: {  // change a digit (kind 6) or replace a whole number (kind 7) in the header
      const auto [hb, he] = header_range(b);
      std::vector<size_t> digits;
      for (size_t i = hb; i < he; ++i) {
        if (b[i] >= '0' && b[i] <= '9') digits.push_back(i);
      }
      if (digits.empty()) return;
      size_t pos = *rc::gen::elementOf(digits);
      if (kind == 6) {
        b[pos] = static_cast<uint8_t>('0' + *rc::gen::inRange(0, 10));
        return;
      }
      while (pos > hb && b[pos - 1] >= '0' && b[pos - 1] <= '9') --pos;
      size_t end = pos;
      while (end < he && b[end] >= '0' && b[end] <= '9') ++end;
      splice(b, pos, *rc::gen::elementOf(kInterestingNumbers), end - pos, /*fix_length=*/true);
      return;
    }
  }
}

// Either a consistent, in-bounds file or an InputError naming the source.
void check_reader(const std::vector<uint8_t>& mutated) {
  // Exact capacity, so ASan reports any read past the end of the buffer.
  std::vector<uint8_t> exact(mutated.begin(), mutated.end());
  exact.shrink_to_fit();
  try {
    const SafetensorsFile f = SafetensorsFile::from_bytes(kSource, std::move(exact));
    const std::span<const uint8_t> all = f.file_bytes();
    RC_ASSERT(all.size() == mutated.size());
    RC_ASSERT(f.data_offset_bytes() <= all.size());
    uint64_t cursor_bytes = 0;
    unsigned checksum = 0;
    for (const SafetensorsEntry& e : f.entries()) {
      const std::optional<DType> dtype = dtype_from_safetensors(e.dtype);
      RC_ASSERT(dtype.has_value());
      const std::span<const uint8_t> b = f.bytes(e);
      RC_ASSERT(b.data() >= all.data() + f.data_offset_bytes());
      RC_ASSERT(b.data() + b.size() <= all.data() + all.size());
      RC_ASSERT(static_cast<int64_t>(b.size()) == dtype_storage_bytes(*dtype, e.numel()));
      RC_ASSERT(e.begin_bytes == cursor_bytes);
      RC_ASSERT(f.find(e.name) == &e);
      for (uint8_t v : b) checksum += v;  // touch every byte
      cursor_bytes = e.end_bytes;
    }
    (void)checksum;
    RC_ASSERT(f.data_offset_bytes() + cursor_bytes == all.size());
    RC_TAG("accepted");
  } catch (const InputError& e) {
    RC_ASSERT(e.source() == std::string(kSource));
    RC_ASSERT(std::string(e.what()).find(kSource) != std::string::npos);
    RC_TAG("rejected");
  }
}

RC_GTEST_PROP(SafetensorsFuzz, ValidFilesRoundTrip, ()) {
  const GeneratedFile g = generate_valid_file();
  const SafetensorsFile f = SafetensorsFile::from_bytes(kSource, g.bytes);
  RC_ASSERT(f.data_offset_bytes() % 8 == 0);
  RC_ASSERT(f.entries().size() == g.tensors.size());
  for (const GeneratedTensor& t : g.tensors) {
    const SafetensorsEntry& e = f.at(t.name);
    RC_ASSERT(e.dtype == t.dtype);
    RC_ASSERT(e.shape == t.shape);
    const std::span<const uint8_t> b = f.bytes(e);
    RC_ASSERT(std::vector<uint8_t>(b.begin(), b.end()) == t.bytes);
  }
  check_reader(g.bytes);
}

RC_GTEST_PROP(SafetensorsFuzz, MutatedFilesAreRejectedOrSafe, ()) {
  std::vector<uint8_t> bytes = generate_valid_file().bytes;
  const int mutations = *rc::gen::inRange(1, 5);
  for (int i = 0; i < mutations; ++i) mutate(bytes);
  check_reader(bytes);
}

}  // namespace
}  // namespace dsv4
