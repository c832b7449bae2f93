// The Scenario's JSON form and the recorder's case files: lossless round trips, strict parsing that
// names the JSON path of every error, content-named atomic writes.
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <regex>
#include <set>
#include <sstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "engine/core/error.h"
#include "properties/case_file.h"
#include "properties/scenario_json.h"

namespace dsv4::props {

// Field-by-field equality for the round-trip checks. A member added to scenario.h must be added
// here too; FullScenarioSetsEveryField catches a table entry the full fixture leaves at its default.
bool operator==(const RequestSpec& a, const RequestSpec& b) {
  return a.id == b.id && a.prompt == b.prompt && a.arrival_step == b.arrival_step &&
         a.max_new_tokens == b.max_new_tokens;
}
bool operator==(const EngineSpec& a, const EngineSpec& b) {
  return a.config == b.config && a.weight_seed == b.weight_seed && a.quant == b.quant &&
         a.requests == b.requests && a.backend == b.backend && a.page_size == b.page_size &&
         a.swa_page_size == b.swa_page_size && a.c4_ring_size == b.c4_ring_size &&
         a.c128_ring_size == b.c128_ring_size && a.batch_buckets == b.batch_buckets &&
         a.max_running_requests == b.max_running_requests &&
         a.chunked_prefill_tokens == b.chunked_prefill_tokens && a.pp_partition == b.pp_partition &&
         a.cp == b.cp && a.graphs == b.graphs && a.multi_stream == b.multi_stream && a.mtp == b.mtp &&
         a.draft_tokens == b.draft_tokens && a.indexer_sms == b.indexer_sms && a.schedule == b.schedule;
}
bool operator==(const ViewSpec& a, const ViewSpec& b) {
  return a.op == b.op && a.tokens == b.tokens && a.layout == b.layout && a.pad == b.pad && a.seed == b.seed;
}
bool operator==(const TranslationSpec& a, const TranslationSpec& b) {
  return a.swa_page_size == b.swa_page_size && a.ring_size == b.ring_size && a.ratio == b.ratio &&
         a.swa_page_count == b.swa_page_count && a.swa_locs == b.swa_locs;
}
bool operator==(const ConversionSpec& a, const ConversionSpec& b) {
  return a.format == b.format && a.inputs == b.inputs;
}
bool operator==(const ScheduleSpec& a, const ScheduleSpec& b) {
  return a.context_lens == b.context_lens && a.rows == b.rows && a.next_n == b.next_n && a.layout == b.layout &&
         a.block_kv == b.block_kv && a.num_sms == b.num_sms;
}
bool operator==(const Scenario& a, const Scenario& b) {
  return a.suite == b.suite && a.engine == b.engine && a.expect_field == b.expect_field && a.view == b.view &&
         a.translation == b.translation && a.conversion == b.conversion && a.schedule_case == b.schedule_case &&
         a.faults == b.faults;
}
bool operator==(const Verdict& a, const Verdict& b) {
  return a.kind == b.kind && a.signature == b.signature && a.detail == b.detail;
}
bool operator==(const CaseFile& a, const CaseFile& b) {
  return a.version == b.version && a.property == b.property && a.scenario == b.scenario &&
         a.verdict == b.verdict && a.engine_commit == b.engine_commit && a.backend == b.backend &&
         a.recorded_at == b.recorded_at && a.shrink_steps == b.shrink_steps;
}

namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

// Every field away from its default, with values at the edges of their types.
Scenario full_scenario() {
  Scenario s;
  s.suite = "pp-equivalence";
  EngineSpec e;
  e.config = "tiny";
  e.weight_seed = 18446744073709551615ULL;  // uint64 max: must survive as an unsigned JSON number
  e.quant = "w8a8-int8";
  e.requests = {RequestSpec{7, {0, 2147483647, -2147483647 - 1, 42}, 3, 5},
                RequestSpec{-9223372036854775807LL - 1, {}, 9223372036854775807LL, 0}};
  e.backend = "cuda";
  e.page_size = 128;
  e.swa_page_size = 64;
  e.c4_ring_size = 16;
  e.c128_ring_size = 2;
  e.batch_buckets = {1, 3};
  e.max_running_requests = 3;
  e.chunked_prefill_tokens = 77;
  e.pp_partition = {2, 1, 1};
  e.cp = 2;
  e.graphs = true;
  e.multi_stream = false;
  e.mtp = true;
  e.draft_tokens = 1;
  e.indexer_sms = 2;
  e.schedule = "pct:12:3";
  s.engine = e;
  s.expect_field = "page_size";
  s.view = ViewSpec{"indexer_logits", 5, "column-slice", 3, 99};
  s.translation = TranslationSpec{128, 4, 128, 3, {-1, 0, 383, 9223372036854775807LL}};
  s.conversion = ConversionSpec{"e5m2", {0u, 0x7f800000u, 0xffffffffu, 0x80000001u}};
  s.schedule_case = ScheduleSpec{{0, 2147483647, -2147483647 - 1, 63, 65, 128}, 3, 2, "native", 16, 132};
  s.faults = {"missing_wait_event", "ring_off_by_one"};
  return s;
}

// Expects `parse` to throw an InputError from `source` whose field is `path` and whose message
// contains every fragment.
void expect_error(const std::function<void()>& parse, const std::string& source, const std::string& path,
                  const std::vector<std::string>& fragments = {}) {
  try {
    parse();
    ADD_FAILURE() << "accepted; expected an error at " << path;
  } catch (const InputError& e) {
    EXPECT_EQ(e.source(), source) << e.what();
    EXPECT_EQ(e.field(), path) << e.what();
    for (const auto& f : fragments) EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << f << " not in: " << e.what();
  }
}

void expect_scenario_error(const json& j, const std::string& path, const std::vector<std::string>& fragments = {}) {
  expect_error([&] { scenario_from_json(j, "case.json"); }, "case.json", path, fragments);
}

// Collects every leaf of a JSON document by path ("$.engine.requests[0].id" ...).
void leaves(const json& j, const std::string& path, std::map<std::string, json>& out) {
  if (j.is_object()) {
    for (const auto& [k, v] : j.items()) leaves(v, path + "." + k, out);
  } else {
    out[path] = j;
  }
}

TEST(ScenarioJson, FullScenarioRoundTrips) {
  const Scenario s = full_scenario();
  const json j = scenario_to_json(s);
  EXPECT_TRUE(scenario_from_json(j, "mem") == s);
  // Through text too: what a case file holds.
  EXPECT_TRUE(scenario_from_json(json::parse(j.dump(2)), "mem") == s);
  EXPECT_TRUE(j.at("engine").at("weight_seed").is_number_unsigned());
  EXPECT_EQ(j.at("engine").at("weight_seed").get<uint64_t>(), 18446744073709551615ULL);
}

TEST(ScenarioJson, DefaultsRoundTripAndWriteEveryFieldButAbsentSections) {
  Scenario s;
  s.suite = "strided-input";
  const json j = scenario_to_json(s);
  EXPECT_EQ(j, json::parse(R"({"suite": "strided-input", "expect_field": "", "faults": []})"));
  EXPECT_TRUE(scenario_from_json(j, "mem") == s);

  // Present sections at their defaults are written in full and come back present.
  s.engine = EngineSpec{};
  s.view = ViewSpec{};
  s.translation = TranslationSpec{};
  s.conversion = ConversionSpec{};
  s.schedule_case = ScheduleSpec{};
  const json k = scenario_to_json(s);
  EXPECT_EQ(k.at("engine").size(), 20u);
  EXPECT_EQ(k.at("engine").at("batch_buckets"), json::parse("[1, 2, 4, 8]"));
  EXPECT_EQ(k.at("view").size(), 5u);
  EXPECT_EQ(k.at("translation").size(), 5u);
  EXPECT_EQ(k.at("conversion").size(), 2u);
  EXPECT_EQ(k.at("schedule_case").size(), 6u);
  EXPECT_TRUE(scenario_from_json(k, "mem") == s);
}

TEST(ScenarioJson, MissingFieldsTakeTheStructDefaults) {
  const Scenario s = scenario_from_json(json::parse(R"({"suite": "x", "engine": {}, "view": {"op": "q"}})"), "mem");
  Scenario want;
  want.suite = "x";
  want.engine = EngineSpec{};
  want.view = ViewSpec{};
  want.view->op = "q";
  EXPECT_TRUE(s == want);
}

// Guards the fixture: a field added to a table but left at its default in full_scenario() would
// round-trip trivially and hide a broken codec.
TEST(ScenarioJson, FullScenarioSetsEveryField) {
  Scenario defaults;
  defaults.engine = EngineSpec{};
  defaults.engine->requests = {RequestSpec{}, RequestSpec{}};
  defaults.view = ViewSpec{};
  defaults.translation = TranslationSpec{};
  defaults.conversion = ConversionSpec{};
  defaults.schedule_case = ScheduleSpec{};
  std::map<std::string, json> full_leaves, default_leaves;
  leaves(scenario_to_json(full_scenario()), "$", full_leaves);
  json dj = scenario_to_json(defaults);
  leaves(dj, "$", default_leaves);
  EXPECT_EQ(full_leaves.size(), default_leaves.size());
  for (const auto& [path, value] : default_leaves) {
    ASSERT_TRUE(full_leaves.count(path)) << path;
    EXPECT_NE(full_leaves[path], value) << path << " is at its default in full_scenario()";
  }
  // Requests are inside a list, so check their leaves separately.
  for (const auto& [key, value] : dj.at("engine").at("requests")[0].items()) {
    EXPECT_NE(scenario_to_json(full_scenario()).at("engine").at("requests")[0].at(key), value) << key;
  }
}

TEST(ScenarioJson, VerdictRoundTripsEveryKind) {
  for (int k = 0; k <= static_cast<int>(VerdictKind::bad_input); ++k) {
    const Verdict v = Verdict::fail(static_cast<VerdictKind>(k), "sig" + std::to_string(k), "line 1\nline 2");
    const json j = verdict_to_json(v);
    EXPECT_EQ(j.at("kind"), verdict_kind_name(v.kind));
    EXPECT_TRUE(verdict_from_json(j, "mem") == v) << j.dump();
  }
  EXPECT_EQ(verdict_to_json(Verdict::fail(VerdictKind::contract_error, "a", "b")),
            json::parse(R"({"kind": "contract-error", "signature": "a", "detail": "b"})"));
}

TEST(ScenarioJson, MissingSuiteIsRefused) {
  expect_scenario_error(json::parse(R"({"faults": []})"), "$.suite", {"missing required key"});
}

TEST(ScenarioJson, TopLevelMustBeAnObject) {
  expect_scenario_error(json::parse("[1]"), "$", {"must be an object"});
  expect_scenario_error(json::parse("null"), "$", {"must be an object"});
}

TEST(ScenarioJson, UnknownKeyDeepInsideIsRefusedWithTheKnownKeys) {
  json j = scenario_to_json(full_scenario());
  j["engine"]["requests"][1]["promt"] = json::array();
  expect_scenario_error(j, "$.engine.requests[1].promt",
                        {"unknown key", "id, prompt, arrival_step, max_new_tokens"});
  json top = scenario_to_json(full_scenario());
  top["odd key"] = 1;
  expect_scenario_error(top, "$[\"odd key\"]", {"unknown key", "suite"});
  json section = scenario_to_json(full_scenario());
  section["conversion"]["bits"] = 1;
  expect_scenario_error(section, "$.conversion.bits", {"format, inputs"});
}

TEST(ScenarioJson, WrongTypeInAnArrayElementNamesTheElement) {
  json j = scenario_to_json(full_scenario());
  j["engine"]["requests"][0]["prompt"][2] = "5";
  expect_scenario_error(j, "$.engine.requests[0].prompt[2]", {"must be an integer", "a string"});
  json f = scenario_to_json(full_scenario());
  f["faults"][1] = 3;
  expect_scenario_error(f, "$.faults[1]", {"must be a string"});
  json r = scenario_to_json(full_scenario());
  r["engine"]["requests"][1] = json::array();
  expect_scenario_error(r, "$.engine.requests[1]", {"must be an object"});
}

TEST(ScenarioJson, WrongScalarTypesAreRefused) {
  const auto with = [](const std::function<void(json&)>& edit) {
    json j = scenario_to_json(full_scenario());
    edit(j);
    return j;
  };
  expect_scenario_error(with([](json& j) { j["suite"] = 3; }), "$.suite", {"must be a string"});
  expect_scenario_error(with([](json& j) { j["engine"]["config"] = 5; }), "$.engine.config", {"must be a string"});
  expect_scenario_error(with([](json& j) { j["engine"]["page_size"] = 256.0; }), "$.engine.page_size",
                        {"must be an integer", "a float"});
  expect_scenario_error(with([](json& j) { j["engine"]["cp"] = true; }), "$.engine.cp",
                        {"must be an integer", "a boolean"});
  expect_scenario_error(with([](json& j) { j["engine"]["graphs"] = 1; }), "$.engine.graphs", {"true or false"});
  expect_scenario_error(with([](json& j) { j["engine"]["batch_buckets"] = 4; }), "$.engine.batch_buckets",
                        {"must be a list"});
  expect_scenario_error(with([](json& j) { j["view"] = nullptr; }), "$.view", {"must be an object", "null"});
  expect_scenario_error(with([](json& j) { j["engine"] = json::array(); }), "$.engine", {"must be an object"});
}

TEST(ScenarioJson, OutOfRangeIntegersAreRefused) {
  const auto with = [](const std::function<void(json&)>& edit) {
    json j = scenario_to_json(full_scenario());
    edit(j);
    return j;
  };
  // Token ids are int32.
  expect_scenario_error(with([](json& j) { j["engine"]["requests"][0]["prompt"][0] = 2147483648LL; }),
                        "$.engine.requests[0].prompt[0]", {"out of range", "int32"});
  expect_scenario_error(with([](json& j) { j["engine"]["requests"][0]["prompt"][3] = -2147483649LL; }),
                        "$.engine.requests[0].prompt[3]", {"out of range", "int32"});
  // Input bits are uint32.
  expect_scenario_error(with([](json& j) { j["conversion"]["inputs"][2] = 4294967296ULL; }),
                        "$.conversion.inputs[2]", {"out of range", "uint32"});
  expect_scenario_error(with([](json& j) { j["conversion"]["inputs"][0] = -1; }), "$.conversion.inputs[0]",
                        {"must not be negative"});
  // uint64 seeds refuse negatives; int64 fields refuse values past INT64_MAX.
  expect_scenario_error(with([](json& j) { j["engine"]["weight_seed"] = -1; }), "$.engine.weight_seed",
                        {"must not be negative", "uint64"});
  expect_scenario_error(with([](json& j) { j["view"]["seed"] = -5; }), "$.view.seed", {"must not be negative"});
  expect_scenario_error(with([](json& j) { j["engine"]["cp"] = 9223372036854775808ULL; }), "$.engine.cp",
                        {"out of range", "int64"});
  // A number past uint64 parses as a float in JSON: refused as a non-integer, never rounded.
  expect_scenario_error(json::parse(R"({"suite": "s", "engine": {"weight_seed": 18446744073709551616}})"),
                        "$.engine.weight_seed", {"must be an integer"});
}

TEST(ScenarioJson, VerdictErrorsNameThePath) {
  expect_error([] { verdict_from_json(json::parse(R"({"kind": "flaky", "signature": "x"})"), "v.json"); }, "v.json",
               "$.kind", {"unknown verdict kind", "\"flaky\"", "contract-error", "bad-input"});
  expect_error([] { verdict_from_json(json::parse(R"({"signature": "x"})"), "v.json"); }, "v.json", "$.kind",
               {"missing required key"});
  expect_error([] { verdict_from_json(json::parse(R"({"kind": 3})"), "v.json"); }, "v.json", "$.kind",
               {"must be a verdict kind"});
  expect_error([] { verdict_from_json(json::parse(R"({"kind": "race", "sig": "x"})"), "v.json"); }, "v.json", "$.sig",
               {"kind, signature, detail"});
  // An embedded verdict names its full path.
  expect_error([] { verdict_from_json(json::parse(R"({"kind": "hung"})"), "c.json", "$.verdict"); }, "c.json",
               "$.verdict.kind");
}

// ---- case files ----

class CaseFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("dsv4_case_test_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  static CaseFile sample() {
    CaseFile c;
    c.property = "pp-equivalence";
    c.scenario = full_scenario();
    c.verdict = Verdict::fail(VerdictKind::mismatch, "layer 3 attn_output", "max abs diff 0.5 > atol 0.01");
    c.engine_commit = "v0.3-12-gabcdef0";
    c.backend = "sim";
    c.recorded_at = "2025-01-31T12:34:56Z";
    c.shrink_steps = 17;
    return c;
  }
  // Every name in the directory (temporary files start with '.').
  std::set<std::string> listing() const {
    std::set<std::string> out;
    for (const auto& e : fs::directory_iterator(dir_)) out.insert(e.path().filename().string());
    return out;
  }
  std::string write_text(const std::string& name, const std::string& text) const {
    fs::create_directories(dir_);
    const std::string path = (dir_ / name).string();
    std::ofstream(path, std::ios::binary) << text;
    return path;
  }
  static std::string slurp(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
  }

  fs::path dir_;
};

TEST_F(CaseFiles, WriteThenReadEquals) {
  const CaseFile c = sample();
  const WrittenCase w = write_case_file((dir_ / "nested" / "corpus").string(), c);  // parents created
  EXPECT_TRUE(w.written);
  EXPECT_TRUE(fs::is_regular_file(w.path));
  EXPECT_TRUE(read_case_file(w.path) == c);
  EXPECT_TRUE(case_from_json(case_to_json(c), "mem") == c);
}

TEST_F(CaseFiles, NameIsPropertyAndSixteenHexDigits) {
  const WrittenCase w = write_case_file(dir_.string(), sample());
  const std::string name = fs::path(w.path).filename().string();
  EXPECT_TRUE(std::regex_match(name, std::regex("pp-equivalence-[0-9a-f]{16}\\.json"))) << name;
  EXPECT_EQ(name, case_file_name(sample()));
  EXPECT_EQ(fs::path(w.path).parent_path(), dir_);
  // A property that is not a plain file name cannot escape the directory.
  CaseFile odd = sample();
  odd.property = "../x/y";
  EXPECT_EQ(case_file_name(odd).find('/'), std::string::npos);
  EXPECT_NE(case_file_name(odd).rfind("..", 0), 0u);
}

TEST_F(CaseFiles, FileIsPrettyPrintedWithATrailingNewline) {
  const std::string text = slurp(write_case_file(dir_.string(), sample()).path);
  ASSERT_GE(text.size(), 4u);
  EXPECT_EQ(text.substr(0, 2), "{\n");
  EXPECT_EQ(text.substr(text.size() - 2), "}\n");
  EXPECT_NE(text.find("\n  \"backend\": \"sim\""), std::string::npos) << text;
  EXPECT_NE(text.find("\n    \"suite\": \"pp-equivalence\""), std::string::npos) << text;
  EXPECT_EQ(json::parse(text), case_to_json(sample()));
}

TEST_F(CaseFiles, HashIsFnv1a64) {
  // The published FNV-1a 64 test vectors: the names must not change with the compiler or library.
  EXPECT_EQ(fnv1a_64(""), 0xcbf29ce484222325ULL);
  EXPECT_EQ(fnv1a_64("a"), 0xaf63dc4c8601ec8cULL);
  EXPECT_EQ(fnv1a_64("foobar"), 0x85944171f73967e8ULL);
}

TEST_F(CaseFiles, SameCaseIsWrittenOnce) {
  const WrittenCase first = write_case_file(dir_.string(), sample());
  ASSERT_TRUE(first.written);
  // Metadata outside the hash (time, commit, backend, shrink steps, detail) names the same case.
  CaseFile again = sample();
  again.recorded_at = "2030-01-01T00:00:00Z";
  again.engine_commit = "unknown";
  again.shrink_steps = 3;
  again.verdict.detail = "another wording";
  const WrittenCase second = write_case_file(dir_.string(), again);
  EXPECT_FALSE(second.written);
  EXPECT_EQ(second.path, first.path);
  EXPECT_EQ(listing().size(), 1u);
  EXPECT_TRUE(read_case_file(first.path) == sample());  // the first one stays
}

TEST_F(CaseFiles, DifferentSignatureKindOrScenarioGivesAnotherFile) {
  const WrittenCase base = write_case_file(dir_.string(), sample());
  CaseFile sig = sample();
  sig.verdict.signature = "layer 4 attn_output";
  CaseFile kind = sample();
  kind.verdict.kind = VerdictKind::race;
  CaseFile scen = sample();
  scen.scenario.engine->requests[0].prompt[0] = 1;
  std::set<std::string> paths = {base.path};
  for (const CaseFile& c : {sig, kind, scen}) {
    const WrittenCase w = write_case_file(dir_.string(), c);
    EXPECT_TRUE(w.written);
    paths.insert(w.path);
    EXPECT_TRUE(read_case_file(w.path) == c);
  }
  EXPECT_EQ(paths.size(), 4u);
  EXPECT_EQ(listing().size(), 4u);
}

TEST_F(CaseFiles, NoTemporaryFileIsLeftBehind) {
  for (int i = 0; i < 5; ++i) {
    CaseFile c = sample();
    c.verdict.signature = "s" + std::to_string(i % 3);  // two repeats
    write_case_file(dir_.string(), c);
  }
  const auto names = listing();
  EXPECT_EQ(names.size(), 3u);
  for (const auto& n : names) {
    EXPECT_TRUE(std::regex_match(n, std::regex("pp-equivalence-[0-9a-f]{16}\\.json"))) << n;
  }
}

TEST_F(CaseFiles, FailedWriteLeavesNoTemporaryFile) {
  // A directory squatting on the case's name is refused by name (a rename would fail on it).
  const CaseFile c = sample();
  fs::create_directories(dir_ / case_file_name(c));
  expect_error([&] { write_case_file(dir_.string(), c); }, (dir_ / case_file_name(c)).string(), "",
               {"not a regular file"});
  EXPECT_EQ(listing(), std::set<std::string>{case_file_name(c)});
  // `shrink --out` onto a FIFO (or, as root, a device such as /dev/null): refused, left a FIFO.
  const fs::path fifo = dir_ / "pipe";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  expect_error([&] { write_case_file_at(fifo.string(), c); }, fifo.string(), "", {"not a regular file"});
  EXPECT_TRUE(fs::is_fifo(fifo));
  EXPECT_EQ(listing(), (std::set<std::string>{case_file_name(c), "pipe"}));
  // A directory path that is a file is refused naming it.
  const std::string file = write_text("plain", "x");
  expect_error([&] { write_case_file(file + "/sub", c); }, file + "/sub", "", {"cannot create the case directory"});
}

TEST_F(CaseFiles, TruncatedFileIsRefusedWithPathAndByteOffset) {
  const std::string text = slurp(write_case_file(dir_.string(), sample()).path);
  const std::string path = write_text("truncated.json", text.substr(0, text.size() / 2));
  expect_error([&] { read_case_file(path); }, path, "", {"not valid JSON", "byte offset"});
  const std::string empty = write_text("empty.json", "");
  expect_error([&] { read_case_file(empty); }, empty, "", {"byte offset"});
}

TEST_F(CaseFiles, WrongOrMissingVersionIsRefused) {
  json j = case_to_json(sample());
  j["version"] = 2;
  j["new_in_v2"] = true;  // the version is reported, not the key a newer format added
  const std::string v2 = write_text("v2.json", j.dump(2));
  expect_error([&] { read_case_file(v2); }, v2, "$.version", {"version 2", "reads case format version 1"});
  j["version"] = "1";
  const std::string str = write_text("str.json", j.dump(2));
  expect_error([&] { read_case_file(str); }, str, "$.version", {"\"1\"", "version 1"});
  j.erase("version");
  const std::string missing = write_text("missing.json", j.dump(2));
  expect_error([&] { read_case_file(missing); }, missing, "$.version", {"missing", "version 1"});
}

TEST_F(CaseFiles, ErrorsInsideTheScenarioNameTheFullPath) {
  json j = case_to_json(sample());
  j["scenario"]["engine"]["requests"][1]["prompt"] = json::parse("[1, 2, 99999999999]");
  const std::string bad = write_text("bad.json", j.dump(2));
  expect_error([&] { read_case_file(bad); }, bad, "$.scenario.engine.requests[1].prompt[2]", {"int32"});
  json k = case_to_json(sample());
  k["verdict"]["kind"] = "flaky";
  expect_error([&] { case_from_json(k, "mem"); }, "mem", "$.verdict.kind", {"unknown verdict kind"});
  json m = case_to_json(sample());
  m.erase("scenario");
  expect_error([&] { case_from_json(m, "mem"); }, "mem", "$.scenario", {"missing required key"});
  json n = case_to_json(sample());
  n["shrink_steps"] = -1;
  expect_error([&] { case_from_json(n, "mem"); }, "mem", "$.shrink_steps", {"negative"});
  json u = case_to_json(sample());
  u["recorder"] = "x";
  expect_error([&] { case_from_json(u, "mem"); }, "mem", "$.recorder", {"unknown key", "engine_commit"});
}

TEST_F(CaseFiles, DuplicateKeyIsRefused) {
  const std::string text = R"({"version": 1, "property": "p", "verdict": {"kind": "race"},
    "scenario": {"suite": "s", "engine": {"requests": [{}, {"id": 1, "id": 2}]}}})";
  const std::string path = write_text("dup.json", text);
  expect_error([&] { read_case_file(path); }, path, "$.scenario.engine.requests[1].id", {"twice"});
}

TEST_F(CaseFiles, MissingFileIsRefusedNamingIt) {
  const std::string path = (dir_ / "absent.json").string();
  expect_error([&] { read_case_file(path); }, path, "", {"cannot open"});
}

TEST_F(CaseFiles, OptionalMetadataDefaults) {
  const CaseFile c = case_from_json(
      json::parse(R"({"version": 1, "property": "p", "scenario": {"suite": "p"}, "verdict": {"kind": "hang"}})"),
      "mem");
  EXPECT_EQ(c.version, kCaseFormatVersion);
  EXPECT_EQ(c.property, "p");
  EXPECT_EQ(c.verdict.kind, VerdictKind::hang);
  EXPECT_EQ(c.engine_commit, "");
  EXPECT_EQ(c.shrink_steps, 0);
}

TEST(UtcNow, IsIso8601InUtc) {
  const std::string now = utc_now_iso8601();
  EXPECT_TRUE(std::regex_match(now, std::regex(R"(20\d\d-[01]\d-[0-3]\dT[0-2]\d:[0-5]\d:[0-6]\dZ)"))) << now;
}

}  // namespace
}  // namespace dsv4::props
