// Safetensors reader/writer: round trips, the on-disk layout, and one test per malformed-file
// case the reader must reject with an InputError naming the file and the tensor/field.
#include "engine/checkpoint/safetensors.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/core/error.h"

namespace dsv4 {
namespace {

namespace fs = std::filesystem;

constexpr const char* kSource = "bad.safetensors";

std::vector<uint8_t> u64_le(uint64_t v) {
  std::vector<uint8_t> out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
  return out;
}

// A file with the given header text, its true length in the first 8 bytes, and `data`.
std::vector<uint8_t> make_file(std::string_view header, const std::vector<uint8_t>& data = {}) {
  std::vector<uint8_t> out = u64_le(header.size());
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

std::vector<uint8_t> iota_bytes(size_t n, uint8_t start = 1) {
  std::vector<uint8_t> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<uint8_t>(start + i);
  return out;
}

void expect_rejected(const std::vector<uint8_t>& bytes, const std::string& field,
                     const std::string& fragment) {
  try {
    (void)SafetensorsFile::from_bytes(kSource, bytes);
    ADD_FAILURE() << "accepted a malformed file";
  } catch (const InputError& e) {
    const std::string what = e.what();
    EXPECT_EQ(e.source(), kSource);
    EXPECT_EQ(e.field(), field) << what;
    EXPECT_NE(what.find(kSource), std::string::npos) << what;
    EXPECT_NE(what.find(field), std::string::npos) << what;
    EXPECT_NE(what.find(fragment), std::string::npos) << what;
  }
}

// A macro so failures report the caller's line; variadic because of braced byte lists.
#define EXPECT_REJECTED(...)             \
  do {                                   \
    SCOPED_TRACE("expect_rejected");     \
    expect_rejected(__VA_ARGS__);        \
  } while (0)

// A per-test scratch directory (tests may run in parallel under ctest -j).
class TempDir {
 public:
  TempDir() {
    const auto* info = testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() / ("dsv4_safetensors_" + std::string(info->name()) + "_" +
                                         std::to_string(::getpid()));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

struct Expected {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

// Several dtypes, a zero-size tensor, a scalar, fp4 stored packed as I8, and odd byte counts so
// the data section is not naturally aligned per tensor.
std::vector<Expected> sample_tensors() {
  return {
      {"layers.0.attn.wq", "BF16", {2, 3}, iota_bytes(12, 10)},
      {"layers.0.attn.scale", "F8_E8M0", {3}, iota_bytes(3, 120)},
      {"bias", "F32", {2}, iota_bytes(8, 40)},
      {"empty", "F16", {0, 5}, {}},
      {"scalar", "F64", {}, iota_bytes(8, 70)},
      {"mask", "BOOL", {3}, {1, 0, 1}},
      {"ids", "I64", {2}, iota_bytes(16, 90)},
      {"counts", "I32", {1}, iota_bytes(4, 200)},
      {"fp8", "F8_E4M3", {1, 3}, iota_bytes(3, 7)},
      {"fp8b", "F8_E5M2", {2}, iota_bytes(2, 17)},
      {"fp4_packed", "I8", {2, 2}, iota_bytes(4, 30)},
      {"raw", "U8", {5}, iota_bytes(5, 250)},
  };
}

SafetensorsWriter sample_writer() {
  SafetensorsWriter w;
  for (const Expected& t : sample_tensors()) {
    w.add(t.name, *dtype_from_safetensors(t.dtype), t.shape, t.bytes);
  }
  w.set_metadata("format", "pt");
  w.set_metadata("producer", "dsv4-harness \xE2\x9C\x93");  // UTF-8 survives
  return w;
}

void expect_matches_sample(const SafetensorsFile& f) {
  const std::vector<Expected> expected = sample_tensors();
  ASSERT_EQ(f.entries().size(), expected.size());
  for (const Expected& t : expected) {
    SCOPED_TRACE(t.name);
    const SafetensorsEntry* e = f.find(t.name);
    ASSERT_NE(e, nullptr);
    EXPECT_EQ(e->dtype, t.dtype);
    EXPECT_EQ(e->shape, t.shape);
    const std::span<const uint8_t> b = f.bytes(*e);
    EXPECT_EQ(std::vector<uint8_t>(b.begin(), b.end()), t.bytes);
  }
  const std::map<std::string, std::string> meta = {{"format", "pt"},
                                                   {"producer", "dsv4-harness \xE2\x9C\x93"}};
  EXPECT_EQ(f.metadata(), meta);
  // entries() is in data-offset order and tiles the data section.
  uint64_t cursor_bytes = 0;
  for (const SafetensorsEntry& e : f.entries()) {
    EXPECT_EQ(e.begin_bytes, cursor_bytes) << e.name;
    cursor_bytes = e.end_bytes;
  }
  EXPECT_EQ(cursor_bytes, f.file_bytes().size() - f.data_offset_bytes());
}

// ---------------------------------------------------------------------------------------------
// Round trips and layout

TEST(SafetensorsRoundTrip, WriteThenOpenMapsTheFile) {
  TempDir dir;
  const std::string path = dir.file("sample.safetensors");
  sample_writer().write(path);
  const SafetensorsFile f = SafetensorsFile::open(path);
  EXPECT_TRUE(f.is_mapped());
  EXPECT_EQ(f.source(), path);
  expect_matches_sample(f);
}

TEST(SafetensorsRoundTrip, FromBytes) {
  const SafetensorsFile f = SafetensorsFile::from_bytes("mem", sample_writer().serialize());
  EXPECT_FALSE(f.is_mapped());
  EXPECT_EQ(f.source(), "mem");
  expect_matches_sample(f);
}

TEST(SafetensorsRoundTrip, EmptyWriterGivesValidFile) {
  const std::vector<uint8_t> bytes = SafetensorsWriter().serialize();
  const SafetensorsFile f = SafetensorsFile::from_bytes("mem", bytes);
  EXPECT_TRUE(f.entries().empty());
  EXPECT_TRUE(f.metadata().empty());
  EXPECT_EQ(bytes.size() % 8, 0u);
}

TEST(SafetensorsRoundTrip, MovedFileStillReads) {
  TempDir dir;
  const std::string path = dir.file("sample.safetensors");
  sample_writer().write(path);
  SafetensorsFile a = SafetensorsFile::open(path);
  SafetensorsFile b = std::move(a);
  expect_matches_sample(b);
  SafetensorsFile c = SafetensorsFile::from_bytes("mem", make_file("{}"));
  c = std::move(b);  // unmaps nothing it does not own; c now owns the mapping
  expect_matches_sample(c);
}

TEST(SafetensorsLayout, CheckedByHand) {
  const std::vector<uint8_t> bytes = sample_writer().serialize();
  ASSERT_GE(bytes.size(), 8u);
  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = (header_bytes << 8) | bytes[i];
  ASSERT_LE(8 + header_bytes, bytes.size());
  EXPECT_EQ((8 + header_bytes) % 8, 0u) << "data section must start 8-byte aligned";

  const std::string header(bytes.begin() + 8, bytes.begin() + 8 + header_bytes);
  const size_t json_end = header.find_last_not_of(' ') + 1;
  EXPECT_LT(header.size() - json_end, 8u) << "padding is spaces only, less than 8 of them";
  EXPECT_EQ(header.front(), '{');
  EXPECT_EQ(header[json_end - 1], '}');

  const nlohmann::json j = nlohmann::json::parse(header);
  const std::vector<Expected> expected = sample_tensors();
  ASSERT_EQ(j.size(), expected.size() + 1);  // + __metadata__
  EXPECT_EQ(j.at("__metadata__").at("format"), "pt");

  const uint64_t data_offset_bytes = 8 + header_bytes;
  uint64_t cursor_bytes = 0;
  for (const Expected& t : expected) {  // the writer keeps insertion order, contiguous
    SCOPED_TRACE(t.name);
    const nlohmann::json& e = j.at(t.name);
    EXPECT_EQ(e.at("dtype"), t.dtype);
    EXPECT_EQ(e.at("shape").get<std::vector<int64_t>>(), t.shape);
    const auto offsets = e.at("data_offsets").get<std::vector<uint64_t>>();
    ASSERT_EQ(offsets.size(), 2u);
    EXPECT_EQ(offsets[0], cursor_bytes);
    EXPECT_EQ(offsets[1] - offsets[0], t.bytes.size());
    const std::vector<uint8_t> stored(bytes.begin() + data_offset_bytes + offsets[0],
                                      bytes.begin() + data_offset_bytes + offsets[1]);
    EXPECT_EQ(stored, t.bytes);
    cursor_bytes = offsets[1];
  }
  EXPECT_EQ(data_offset_bytes + cursor_bytes, bytes.size()) << "no trailing bytes";
}

TEST(SafetensorsLayout, ReaderAcceptsUnalignedHeaderAndPadding) {
  const std::vector<uint8_t> data = iota_bytes(4);
  const SafetensorsFile f = SafetensorsFile::from_bytes(
      kSource, make_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", data));
  EXPECT_NE(f.data_offset_bytes() % 8, 0u);
  EXPECT_EQ(f.at("a").size_bytes(), 4u);
  const SafetensorsFile g = SafetensorsFile::from_bytes(
      kSource, make_file(R"(  {"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}     )", data));
  EXPECT_EQ(g.at("a").numel(), 4);
}

TEST(SafetensorsLayout, ZeroSizeTensorsAtBoundariesAreLegal) {
  const SafetensorsFile f = SafetensorsFile::from_bytes(
      kSource, make_file(R"({"z0":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},
                             "a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},
                             "z1":{"dtype":"BF16","shape":[3,0,7],"data_offsets":[2,2]},
                             "b":{"dtype":"U8","shape":[1],"data_offsets":[2,3]},
                             "z2":{"dtype":"I64","shape":[0],"data_offsets":[3,3]}})",
                         iota_bytes(3)));
  ASSERT_EQ(f.entries().size(), 5u);
  EXPECT_EQ(f.entries()[0].name, "z0");
  EXPECT_EQ(f.entries()[4].name, "z2");
  EXPECT_TRUE(f.bytes(f.at("z1")).empty());
  EXPECT_EQ(f.at("z1").numel(), 0);
}

TEST(SafetensorsLayout, HugeDimsWithAZeroDimAreEmptyNotOverflow) {
  const SafetensorsFile f = SafetensorsFile::from_bytes(
      kSource, make_file(R"({"z":{"dtype":"F64","shape":[4294967296,4294967296,0],)"
                         R"("data_offsets":[0,0]}})"));
  EXPECT_EQ(f.at("z").size_bytes(), 0u);
}

TEST(SafetensorsLayout, UnknownKeysInsideATensorEntryAreIgnored) {
  const SafetensorsFile f = SafetensorsFile::from_bytes(
      kSource,
      make_file(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"note":"x"}})", {9}));
  EXPECT_EQ(f.bytes(f.at("a"))[0], 9);
}

TEST(SafetensorsFile, AtNamesFileAndTensorWhenAbsent) {
  const SafetensorsFile f = SafetensorsFile::from_bytes(kSource, make_file("{}"));
  EXPECT_EQ(f.find("w"), nullptr);
  try {
    (void)f.at("layers.3.w");
    ADD_FAILURE() << "at() found a missing tensor";
  } catch (const InputError& e) {
    EXPECT_EQ(e.source(), kSource);
    EXPECT_EQ(e.field(), "layers.3.w");
    EXPECT_NE(std::string(e.what()).find("tensor not found"), std::string::npos);
  }
}

// ---------------------------------------------------------------------------------------------
// dtypes

TEST(SafetensorsDType, NamesRoundTrip) {
  const std::pair<const char*, DType> table[] = {
      {"F64", DType::f64},     {"F32", DType::f32},           {"F16", DType::f16},
      {"BF16", DType::bf16},   {"F8_E4M3", DType::f8_e4m3fn}, {"F8_E5M2", DType::f8_e5m2},
      {"F8_E8M0", DType::ue8m0}, {"I8", DType::i8},           {"U8", DType::u8},
      {"I32", DType::i32},     {"I64", DType::i64},           {"BOOL", DType::boolean},
  };
  for (const auto& [name, dtype] : table) {
    EXPECT_EQ(dtype_from_safetensors(name), dtype) << name;
    EXPECT_EQ(safetensors_dtype_name(dtype), name) << name;
  }
  EXPECT_EQ(dtype_from_safetensors("f32"), std::nullopt);
  EXPECT_EQ(dtype_from_safetensors("F4"), std::nullopt);
  EXPECT_EQ(dtype_from_safetensors("I16"), std::nullopt);
  EXPECT_EQ(dtype_from_safetensors(""), std::nullopt);
}

TEST(SafetensorsDTypeDeathTest, NoNameForFp4OrFnuz) {
  EXPECT_DEATH((void)safetensors_dtype_name(DType::f4_e2m1), "no safetensors name");
  EXPECT_DEATH((void)safetensors_dtype_name(DType::f8_e4m3fnuz), "no safetensors name");
}

TEST(SafetensorsWriterDeathTest, AddChecksByteCount) {
  SafetensorsWriter w;
  EXPECT_DEATH(w.add("w", DType::f32, {2}, iota_bytes(7)), "expected 8");
  EXPECT_DEATH(w.add("w", DType::f4_e2m1, {2}, iota_bytes(1)), "no safetensors name");
}

// ---------------------------------------------------------------------------------------------
// open() and write() failures

TEST(SafetensorsOpen, MissingFile) {
  TempDir dir;
  const std::string path = dir.file("missing.safetensors");
  try {
    (void)SafetensorsFile::open(path);
    ADD_FAILURE() << "opened a missing file";
  } catch (const InputError& e) {
    EXPECT_EQ(e.source(), path);
    EXPECT_NE(std::string(e.what()).find("No such file"), std::string::npos) << e.what();
  }
}

TEST(SafetensorsOpen, DirectoryIsNotAFile) {
  TempDir dir;
  try {
    (void)SafetensorsFile::open(dir.path().string());
    ADD_FAILURE() << "opened a directory";
  } catch (const InputError& e) {
    EXPECT_EQ(e.source(), dir.path().string());
  }
}

TEST(SafetensorsOpen, EmptyAndShortFilesFromDisk) {
  TempDir dir;
  for (size_t size : {0, 7}) {
    const std::string path = dir.file("short" + std::to_string(size) + ".safetensors");
    std::ofstream(path, std::ios::binary).write("\x01\x00\x00\x00\x00\x00\x00", size);
    try {
      (void)SafetensorsFile::open(path);
      ADD_FAILURE() << "opened a " << size << "-byte file";
    } catch (const InputError& e) {
      EXPECT_EQ(e.source(), path);
      EXPECT_EQ(e.field(), "header length");
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos);
    }
  }
}

TEST(SafetensorsOpen, MalformedFileOnDiskNamesPathAndTensor) {
  TempDir dir;
  const std::string path = dir.file("mismatch.safetensors");
  SafetensorsWriter w;
  w.add_raw("w", "F32", {2}, iota_bytes(4));
  w.write(path);
  try {
    (void)SafetensorsFile::open(path);
    ADD_FAILURE() << "opened a malformed file";
  } catch (const InputError& e) {
    EXPECT_EQ(e.source(), path);
    EXPECT_EQ(e.field(), "w");
  }
}

TEST(SafetensorsWrite, OverwritesAtomicallyAndLeavesNoTempFile) {
  TempDir dir;
  const std::string path = dir.file("out.safetensors");
  SafetensorsWriter first;
  first.add("a", DType::u8, {1}, {1});
  first.write(path);
  sample_writer().write(path);
  expect_matches_sample(SafetensorsFile::open(path));
  int files = 0;
  for (const auto& entry : fs::directory_iterator(dir.path())) {
    ++files;
    EXPECT_EQ(entry.path().filename(), "out.safetensors");
  }
  EXPECT_EQ(files, 1);
}

TEST(SafetensorsWrite, FailureNamesThePath) {
  TempDir dir;
  const std::string path = dir.file("no/such/dir/out.safetensors");
  try {
    sample_writer().write(path);
    ADD_FAILURE() << "wrote into a missing directory";
  } catch (const InputError& e) {
    EXPECT_EQ(e.source(), path);
    EXPECT_EQ(e.field(), "");
    EXPECT_NE(std::string(e.what()).find("No such file"), std::string::npos) << e.what();
  }
}

// The rename would swap a device (`dsv4h weights --out /dev/null` as root did), a FIFO or a directory
// for a regular file: each is refused by name and left as it was, with no temp file behind.
TEST(SafetensorsWrite, RefusesAPathThatIsNotARegularFile) {
  TempDir dir;
  const std::string fifo = dir.file("pipe");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  const std::string sub = dir.file("sub");
  fs::create_directory(sub);
  for (const std::string& path : {fifo, sub}) {
    try {
      sample_writer().write(path);
      ADD_FAILURE() << "wrote over " << path;
    } catch (const InputError& e) {
      EXPECT_EQ(e.source(), path);
      EXPECT_NE(std::string(e.what()).find("not a regular file"), std::string::npos) << e.what();
    }
  }
  EXPECT_TRUE(fs::is_fifo(fifo));
  EXPECT_TRUE(fs::is_directory(sub));
  int entries = 0;
  for ([[maybe_unused]] const auto& entry : fs::directory_iterator(dir.path())) ++entries;
  EXPECT_EQ(entries, 2);
}

// write() streams the header and then each tensor: the file equals serialize() byte for byte.
TEST(SafetensorsWrite, FileEqualsSerialize) {
  TempDir dir;
  const std::string path = dir.file("out.safetensors");
  const SafetensorsWriter w = sample_writer();
  w.write(path);
  std::ifstream in(path, std::ios::binary);
  const std::vector<uint8_t> file((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(file, w.serialize());
}

// ---------------------------------------------------------------------------------------------
// Malformed files: one test per case

TEST(SafetensorsMalformed, ShorterThan8Bytes) {
  EXPECT_REJECTED({}, "header length", "shorter than the 8-byte");
  EXPECT_REJECTED({2, 0, 0, 0, 0, 0, 0}, "header length", "shorter than the 8-byte");
}

TEST(SafetensorsMalformed, HeaderLengthPastEndOfFile) {
  std::vector<uint8_t> bytes = make_file("{}");
  bytes[0] = 3;
  EXPECT_REJECTED(bytes, "header length", "past the end of the file");
  EXPECT_REJECTED(u64_le(1), "header length", "past the end of the file");
}

TEST(SafetensorsMalformed, HeaderLengthAbsurd) {
  std::vector<uint8_t> bytes = u64_le(kSafetensorsMaxHeaderBytes + 1);
  bytes.insert(bytes.end(), {'{', '}'});
  EXPECT_REJECTED(bytes, "header length", "exceeds the limit");
  EXPECT_REJECTED(u64_le(~uint64_t{0}), "header length", "exceeds the limit");
}

TEST(SafetensorsMalformed, HeaderNotUtf8) {
  EXPECT_REJECTED(make_file("{\"w\xff\xfe\":{}}"), "header", "not valid UTF-8 JSON");
  EXPECT_REJECTED(make_file("{\"__metadata__\":{\"k\":\"\xc3\"}}"), "header",
                  "not valid UTF-8 JSON");
}

TEST(SafetensorsMalformed, HeaderNotJson) {
  EXPECT_REJECTED(make_file(R"({"w": {"dtype": "F32")"), "header", "not valid UTF-8 JSON");
  EXPECT_REJECTED(make_file(""), "header", "not valid UTF-8 JSON");
}

TEST(SafetensorsMalformed, HeaderWithNulByte) {
  // nlohmann stops at a NUL as if the input ended there; the junk after it must not slip by.
  EXPECT_REJECTED(make_file(std::string("{}\0\0", 4)), "header", "NUL byte");
  EXPECT_REJECTED(make_file(std::string("{}\0{\"w\":1}", 10)), "header", "NUL byte");
}

TEST(SafetensorsMalformed, HeaderNotObject) {
  EXPECT_REJECTED(make_file("[1, 2]"), "header", "not a JSON object");
  EXPECT_REJECTED(make_file("\"text\""), "header", "not a JSON object");
  EXPECT_REJECTED(make_file("null"), "header", "not a JSON object");
}

TEST(SafetensorsMalformed, TensorEntryNotObject) {
  EXPECT_REJECTED(make_file(R"({"w": [0, 4]})"), "w", "not an object");
  EXPECT_REJECTED(make_file(R"({"w": "F32"})"), "w", "not an object");
}

TEST(SafetensorsMalformed, MissingDtype) {
  EXPECT_REJECTED(make_file(R"({"w":{"shape":[1],"data_offsets":[0,4]}})", iota_bytes(4)), "w",
                  "missing 'dtype'");
}

TEST(SafetensorsMalformed, DtypeNotString) {
  EXPECT_REJECTED(make_file(R"({"w":{"dtype":7,"shape":[1],"data_offsets":[0,4]}})", iota_bytes(4)),
                  "w", "'dtype' is");
}

TEST(SafetensorsMalformed, UnknownDtype) {
  EXPECT_REJECTED(make_file(R"({"w":{"dtype":"F4","shape":[1],"data_offsets":[0,1]}})", {0}), "w",
                  "unknown dtype 'F4'");
  EXPECT_REJECTED(make_file(R"({"w":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}})",
                            iota_bytes(4)),
                  "w", "unknown dtype 'f32'");
}

TEST(SafetensorsMalformed, MissingShape) {
  EXPECT_REJECTED(make_file(R"({"w":{"dtype":"F32","data_offsets":[0,4]}})", iota_bytes(4)), "w",
                  "missing 'shape'");
}

TEST(SafetensorsMalformed, ShapeNotArray) {
  EXPECT_REJECTED(make_file(R"({"w":{"dtype":"F32","shape":4,"data_offsets":[0,4]}})",
                            iota_bytes(4)),
                  "w", "'shape' is");
}

TEST(SafetensorsMalformed, NegativeDim) {
  EXPECT_REJECTED(make_file(R"({"w":{"dtype":"F32","shape":[2,-1],"data_offsets":[0,0]}})"), "w",
                  "shape[1] is the integer -1");
}

TEST(SafetensorsMalformed, NonIntegerDim) {
  EXPECT_REJECTED(make_file(R"({"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})",
                            iota_bytes(4)),
                  "w", "shape[0]");
  EXPECT_REJECTED(make_file(R"({"w":{"dtype":"F32","shape":["1"],"data_offsets":[0,4]}})",
                            iota_bytes(4)),
                  "w", "shape[0]");
  // Beyond uint64: nlohmann makes it a float.
  EXPECT_REJECTED(make_file(R"({"w":{"dtype":"F32","shape":[18446744073709551616],)"
                            R"("data_offsets":[0,4]}})",
                            iota_bytes(4)),
                  "w", "shape[0]");
  EXPECT_REJECTED(make_file(R"({"w":{"dtype":"F32","shape":[9223372036854775808],)"
                            R"("data_offsets":[0,4]}})",
                            iota_bytes(4)),
                  "w", "too large");
}

TEST(SafetensorsMalformed, ElementCountOverflow) {
  EXPECT_REJECTED(make_file(R"({"w":{"dtype":"U8","shape":[4294967296,4294967296],)"
                            R"("data_offsets":[0,0]}})"),
                  "w", "element count overflows");
  EXPECT_REJECTED(make_file(R"({"w":{"dtype":"U8","shape":[4294967296,2147483648],)"
                            R"("data_offsets":[0,0]}})"),
                  "w", "element count overflows");
}

TEST(SafetensorsMalformed, ByteSizeOverflow) {
  // 2^62 elements fit int64, 2^62 x 4 bytes do not.
  EXPECT_REJECTED(make_file(R"({"w":{"dtype":"F32","shape":[4611686018427387904],)"
                            R"("data_offsets":[0,0]}})"),
                  "w", "byte size");
}

TEST(SafetensorsMalformed, MissingDataOffsets) {
  EXPECT_REJECTED(make_file(R"({"w":{"dtype":"F32","shape":[1]}})", iota_bytes(4)), "w",
                  "missing 'data_offsets'");
}

TEST(SafetensorsMalformed, DataOffsetsNotTwoIntegers) {
  const std::string head = R"({"w":{"dtype":"U8","shape":[1],"data_offsets":)";
  EXPECT_REJECTED(make_file(head + "[0]}}", {1}), "w", "'data_offsets' must be an array");
  EXPECT_REJECTED(make_file(head + "[0,1,1]}}", {1}), "w", "'data_offsets' must be an array");
  EXPECT_REJECTED(make_file(head + "{\"begin\":0}}}", {1}), "w", "'data_offsets' must be an array");
  EXPECT_REJECTED(make_file(head + "[-1,0]}}", {1}), "w", "two non-negative integers");
  EXPECT_REJECTED(make_file(head + "[0,1.0]}}", {1}), "w", "two non-negative integers");
  EXPECT_REJECTED(make_file(head + "[0,\"1\"]}}", {1}), "w", "two non-negative integers");
}

TEST(SafetensorsMalformed, DataOffsetsBeginAfterEnd) {
  EXPECT_REJECTED(make_file(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[2,1]}})", {1, 2}),
                  "w", "begin 2 is after end 1");
}

TEST(SafetensorsMalformed, EndPastDataSection) {
  EXPECT_REJECTED(make_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                            iota_bytes(4)),
                  "w", "past the end of the data section");
  EXPECT_REJECTED(make_file(R"({"w":{"dtype":"U8","shape":[1],)"
                            R"("data_offsets":[18446744073709551614,18446744073709551615]}})",
                            iota_bytes(4)),
                  "w", "past the end of the data section");
}

TEST(SafetensorsMalformed, ByteSizeMismatch) {
  EXPECT_REJECTED(make_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})",
                            iota_bytes(4)),
                  "w", "needs 8");
  EXPECT_REJECTED(make_file(R"({"w":{"dtype":"BF16","shape":[],"data_offsets":[0,4]}})",
                            iota_bytes(4)),
                  "w", "needs 2");
}

TEST(SafetensorsMalformed, OverlappingTensors) {
  EXPECT_REJECTED(make_file(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                            R"( "b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}})",
                            iota_bytes(6)),
                  "b", "overlap tensor 'a'");
  // Same range twice.
  EXPECT_REJECTED(make_file(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                            R"( "b":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})",
                            iota_bytes(4)),
                  "b", "overlap tensor 'a'");
  // A zero-size tensor inside another one's bytes.
  EXPECT_REJECTED(make_file(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                            R"( "z":{"dtype":"U8","shape":[0],"data_offsets":[2,2]}})",
                            iota_bytes(4)),
                  "z", "overlap tensor 'a'");
}

TEST(SafetensorsMalformed, HoleBetweenTensors) {
  EXPECT_REJECTED(make_file(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
                            R"( "b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}})",
                            iota_bytes(5)),
                  "b", "gap of 1 bytes");
}

TEST(SafetensorsMalformed, HoleAtStartOfDataSection) {
  EXPECT_REJECTED(make_file(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}})",
                            iota_bytes(6)),
                  "a", "gap of 4 bytes");
}

TEST(SafetensorsMalformed, TrailingBytesAfterLastTensor) {
  EXPECT_REJECTED(make_file(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})",
                            iota_bytes(3)),
                  "a", "1 trailing bytes");
  EXPECT_REJECTED(make_file("{}", iota_bytes(8)), "data section", "8 trailing bytes");
}

TEST(SafetensorsMalformed, DuplicateTensorNames) {
  EXPECT_REJECTED(make_file(R"({"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
                            R"( "w":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}})",
                            iota_bytes(4)),
                  "w", "duplicate tensor name");
  // nlohmann would keep the last one, which alone would look like a valid file.
  EXPECT_REJECTED(make_file(R"({"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
                            R"( "w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})",
                            iota_bytes(2)),
                  "w", "duplicate tensor name");
}

TEST(SafetensorsMalformed, DuplicateKeyInsideEntry) {
  EXPECT_REJECTED(make_file(R"({"w":{"dtype":"U8","dtype":"F32","shape":[1],)"
                            R"("data_offsets":[0,1]}})",
                            {1}),
                  "w", "duplicate key 'dtype'");
  EXPECT_REJECTED(make_file(R"({"__metadata__":{"k":"a","k":"b"}})"), "__metadata__",
                  "duplicate key 'k'");
}

TEST(SafetensorsMalformed, MetadataNotStringToString) {
  EXPECT_REJECTED(make_file(R"({"__metadata__":["a"]})"), "__metadata__", "not an object");
  EXPECT_REJECTED(make_file(R"({"__metadata__":"x"})"), "__metadata__", "not an object");
  EXPECT_REJECTED(make_file(R"({"__metadata__":{"k":1}})"), "__metadata__",
                  "value of 'k' is the integer 1, not a string");
  EXPECT_REJECTED(make_file(R"({"__metadata__":{"k":{"nested":"x"}}})"), "__metadata__",
                  "value of 'k'");
  EXPECT_REJECTED(make_file(R"({"__metadata__":{"k":null}})"), "__metadata__", "value of 'k'");
}

TEST(SafetensorsMalformed, EmptyTensorName) {
  EXPECT_REJECTED(make_file(R"({"":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", {1}),
                  "header", "empty name");
}

}  // namespace
}  // namespace dsv4
