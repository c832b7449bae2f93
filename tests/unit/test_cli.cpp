#include <cstdint>
#include <cstring>
#include <filesystem>
#include <iterator>
#include <fstream>
#include <set>
#include <sstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tools/dsv4h/cli.h"

namespace dsv4::cli {
namespace {

struct Result {
  int code;
  std::string out;
  std::string err;
};

Result run(std::vector<std::string> args) {
  std::ostringstream out, err;
  const int code = run_cli(args, out, err);
  return {code, out.str(), err.str()};
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

TEST(Cli, HelpListsEveryCommand) {
  const Result r = run({"--help"});
  EXPECT_EQ(r.code, kExitOk);
  for (const char* c : {"info", "weights", "reference", "generate", "check", "replay", "shrink", "mutants"}) {
    EXPECT_TRUE(contains(r.out, c)) << c;
  }
  EXPECT_EQ(run({}).code, kExitBadInput);
  const Result unknown = run({"frobnicate"});
  EXPECT_EQ(unknown.code, kExitBadInput);
  EXPECT_TRUE(contains(unknown.err, "frobnicate"));
}

TEST(Cli, InfoShowsTheReleasedFlashModel) {
  const Result r = run({"info", "--config", "flash"});
  ASSERT_EQ(r.code, kExitOk) << r.err;
  EXPECT_TRUE(contains(r.out, "43 layers + 1 MTP"));
  EXPECT_TRUE(contains(r.out, "main layers: 2 swa, 21 c4+indexer, 20 c128"));
  EXPECT_TRUE(contains(r.out, "256 routed (6 active)"));
  EXPECT_TRUE(contains(r.out, "  43      0  swa (mtp)"));
  EXPECT_TRUE(contains(r.out, "swa kv (window tokens only)       584"));
}

TEST(Cli, InfoRejectsSwaPageSizeZeroByName) {
  const Result r = run({"info", "--config", "tiny", "--swa-page-size", "0"});
  EXPECT_EQ(r.code, kExitBadInput);
  EXPECT_TRUE(contains(r.err, "swa_page_size")) << r.err;
  EXPECT_TRUE(r.out.empty());
}

TEST(Cli, InfoAcceptsRuntimeFlagsInBothSpellings) {
  const Result r = run({"info", "--config=micro", "--page-size=32", "--swa-page-size", "16"});
  ASSERT_EQ(r.code, kExitOk) << r.err;
  EXPECT_TRUE(contains(r.out, "page_size 32, swa_page_size 16"));
}

TEST(Cli, UsageErrorsNameTheFlag) {
  Result r = run({"info", "--config", "tiny", "--pagesize", "3"});
  EXPECT_EQ(r.code, kExitBadInput);
  EXPECT_TRUE(contains(r.err, "--pagesize"));
  r = run({"info"});
  EXPECT_EQ(r.code, kExitBadInput);
  EXPECT_TRUE(contains(r.err, "--config"));
  r = run({"info", "--config"});
  EXPECT_EQ(r.code, kExitBadInput);
  EXPECT_TRUE(contains(r.err, "needs a value"));
  r = run({"info", "--config", "tiny", "--page-size", "lots"});
  EXPECT_EQ(r.code, kExitBadInput);
  EXPECT_TRUE(contains(r.err, "--page-size"));
  r = run({"weights", "--config", "tiny", "--seed", "-1", "--out", "x.safetensors"});
  EXPECT_EQ(r.code, kExitBadInput);
  EXPECT_TRUE(contains(r.err, "--seed"));
}

TEST(Cli, BadConfigFileNamesFileAndField) {
  const std::string path = ::testing::TempDir() + "/dsv4_bad_config.json";
  std::ofstream(path) << R"({"dim": 128, "n_experts_total": 3})";
  const Result r = run({"info", "--config", path});
  EXPECT_EQ(r.code, kExitBadInput);
  EXPECT_TRUE(contains(r.err, path)) << r.err;
  EXPECT_TRUE(contains(r.err, "n_experts_total")) << r.err;
  const Result missing = run({"info", "--config", "/no/such/dir/config.json"});
  EXPECT_EQ(missing.code, kExitBadInput);
  EXPECT_TRUE(contains(missing.err, "/no/such/dir/config.json"));
}

// A corrupted case file exits 2 with a message naming the file and where in it.
TEST(Cli, ReplayRefusesACorruptedCaseNamingThePath) {
  const std::string dir = ::testing::TempDir() + "/dsv4_cli_cases";
  std::filesystem::create_directories(dir);
  std::ifstream in(std::string(DSV4_SOURCE_DIR) + "/repros/cases/quant-scale-scalar.json");
  const std::string good((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_FALSE(good.empty());
  auto replace = [&](const std::string& from, const std::string& to) {
    std::string text = good;
    const size_t at = text.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    return text.replace(at, from.size(), to);
  };
  const std::vector<std::pair<std::string, std::string>> cases = {
      {good.substr(0, good.size() / 2), "byte"},                                    // truncated
      {replace("\"max_new_tokens\": 1", "\"max_new_tokens\": \"1\""), "$.scenario.engine.requests[0].max_new_tokens"},
      {replace("\"version\": 1", "\"version\": 2"), "$.version"},
      {replace("\"quant-scale-scalar\"\n", "\"quant-scale-scalr\"\n"), "faults[0]"},
      {replace("\"suite\": \"hazard-free\"", "\"suite\": \"fp8-conversion\""), "$.scenario.conversion"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string path = dir + "/bad" + std::to_string(i) + ".json";
    std::ofstream(path) << cases[i].first;
    const Result r = run({"replay", path});
    EXPECT_EQ(r.code, kExitBadInput) << i << ": " << r.out << r.err;
    EXPECT_TRUE(contains(r.err, path)) << r.err;
    EXPECT_TRUE(contains(r.err, cases[i].second)) << r.err;
  }
  const Result missing = run({"replay", dir + "/absent.json"});
  EXPECT_EQ(missing.code, kExitBadInput);
}

TEST(Cli, ReplayChecksBothDirectionsAndShrinkWritesTheSmallerCase) {
  const std::string c = std::string(DSV4_SOURCE_DIR) + "/repros/cases/fp8-round-half-up.json";
  const Result check = run({"replay", c, "--check"});
  EXPECT_EQ(check.code, kExitOk) << check.out;
  EXPECT_TRUE(contains(check.out, "without faults: passes")) << check.out;
  const Result failing = run({"replay", c});
  EXPECT_EQ(failing.code, kExitFinding);
  EXPECT_TRUE(contains(failing.out, "reproduce: dsv4h replay " + c)) << failing.out;
  const Result clean = run({"replay", c, "--without-faults"});
  EXPECT_EQ(clean.code, kExitOk) << clean.out;
  const std::string out = ::testing::TempDir() + "/dsv4_min.json";
  const Result shrunk = run({"shrink", c, "--out", out, "--budget", "5"});
  EXPECT_EQ(shrunk.code, kExitOk) << shrunk.out << shrunk.err;
  EXPECT_TRUE(std::filesystem::exists(out));
  EXPECT_EQ(run({"shrink", c}).code, kExitBadInput);  // --out is required
}

TEST(Cli, CheckAndMutantsRefuseBadFlagsNamingThem) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"check", "--budget", "0"}, "--budget"},
      {{"check", "--budget", "ten"}, "--budget"},
      {{"check", "--suites", "no-such-suite"}, "--suites"},
      {{"check", "--suites", "determinism,"}, "--suites"},
      {{"check", "--faults", "no-such-fault"}, "--faults"},
      {{"check", "--backend", "cuda"}, "--backend"},
      {{"check", "--backend", "tpu"}, "--backend"},
      {{"check", "extra"}, "extra"},
      {{"mutants", "--budget-per-fault", "-1"}, "--budget-per-fault"},
      {{"mutants", "--faults", "fp8-round-half-down"}, "--faults"},
      {{"generate", "--config", "micro", "--faults", "nope"}, "--faults"},
  };
  for (const auto& [argv, flag] : cases) {
    const Result r = run(argv);
    EXPECT_EQ(r.code, kExitBadInput) << argv[0] << " " << argv[1];
    EXPECT_TRUE(contains(r.err, flag)) << r.err;
  }
}

// Speculative decoding's flags: --draft-tokens 1..4 and --draft-extend v1|v2, with --mtp only.
TEST(CliGenerate, DraftFlagsAreCheckedByName) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"generate", "--config", "micro", "--mtp", "--draft-tokens", "0"}, "--draft-tokens"},
      {{"generate", "--config", "micro", "--mtp", "--draft-tokens", "5"}, "--draft-tokens"},
      {{"generate", "--config", "micro", "--mtp", "--draft-tokens", "two"}, "--draft-tokens"},
      {{"generate", "--config", "micro", "--draft-tokens", "2"}, "--draft-tokens"},
      {{"generate", "--config", "micro", "--mtp", "--draft-extend", "v3"}, "--draft-extend"},
      {{"generate", "--config", "micro", "--draft-extend", "v1"}, "--draft-extend"},
  };
  for (const auto& [argv, flag] : cases) {
    const Result r = run(argv);
    EXPECT_EQ(r.code, kExitBadInput) << argv[3] << " " << (argv.size() > 4 ? argv[4] : "");
    EXPECT_TRUE(contains(r.err, flag)) << r.err;
  }
}

// Chained drafts with DRAFT_EXTEND (v1), graphs on, through the oracle: a pass.
TEST(CliGenerate, ChainedDraftsWithDraftExtendV1PassTheReference) {
  const Result r = run({"generate", "--config", "micro", "--requests", "2", "--decode", "6", "--mtp", "--draft-tokens",
                        "3", "--draft-extend", "v1", "--graph", "--compare-reference"});
  EXPECT_EQ(r.code, kExitOk) << r.out << r.err;
  EXPECT_TRUE(contains(r.out, "mtp (3 draft tokens, draft extend v1)")) << r.out;
  EXPECT_TRUE(contains(r.out, "speculative decoding: ")) << r.out;
  EXPECT_TRUE(contains(r.out, "verdict: PASS")) << r.out;
}

TEST(Cli, ListsSuitesAndFaults) {
  const Result suites = run({"check", "--list"});
  EXPECT_EQ(suites.code, kExitOk);
  EXPECT_TRUE(contains(suites.out, "pp-equivalence"));
  const Result faults = run({"mutants", "--list"});
  EXPECT_EQ(faults.code, kExitOk);
  EXPECT_TRUE(contains(faults.out, "lazy-upgrade-on-alt-stream"));
}

TEST(Cli, CheckPassesCleanAndRecordsAnInjectedFault) {
  const std::string corpus = ::testing::TempDir() + "/dsv4_cli_corpus";
  const Result clean = run({"check", "--suites", "index-translation,fp8-conversion", "--budget", "2", "--corpus", corpus});
  EXPECT_EQ(clean.code, kExitOk) << clean.out << clean.err;
  EXPECT_TRUE(contains(clean.out, "0 of 2 suites failed"));
  const Result faulty =
      run({"check", "--suites", "fp8-conversion", "--budget", "5", "--corpus", corpus, "--faults", "fp8-round-half-up"});
  EXPECT_EQ(faulty.code, kExitFinding) << faulty.out;
  EXPECT_TRUE(contains(faulty.out, "case: " + corpus + "/fp8-conversion-")) << faulty.out;
}

// Reads the file as a generic safetensors parser would, without the project's reader.
TEST(Cli, WeightsWritesAStandardSafetensorsFile) {
  const std::string path = ::testing::TempDir() + "/dsv4_tiny.safetensors";
  const Result r = run({"weights", "--config", "tiny", "--seed", "1", "--out", path});
  ASSERT_EQ(r.code, kExitOk) << r.err;
  EXPECT_TRUE(contains(r.out, "502 tensors"));
  std::ifstream in(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_GE(bytes.size(), 8u);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = header_len << 8 | static_cast<uint8_t>(bytes[static_cast<size_t>(i)]);
  ASSERT_LE(8 + header_len, bytes.size());
  const auto header = nlohmann::json::parse(bytes.substr(8, header_len));
  const uint64_t data_bytes = bytes.size() - 8 - header_len;
  uint64_t covered = 0;
  std::set<std::string> dtypes;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    const auto offsets = entry.at("data_offsets");
    covered += offsets[1].get<uint64_t>() - offsets[0].get<uint64_t>();
    EXPECT_LE(offsets[1].get<uint64_t>(), data_bytes) << name;
    dtypes.insert(entry.at("dtype").get<std::string>());
  }
  EXPECT_EQ(covered, data_bytes);
  EXPECT_EQ(dtypes, (std::set<std::string>{"BF16", "F32", "F8_E4M3", "F8_E8M0", "I32", "I8"}));
  EXPECT_EQ(header.at("layers.1.attn.indexer.wq_b.weight").at("dtype"), "F8_E4M3");
  EXPECT_EQ(header.at("layers.1.attn.indexer.wq_b.weight").at("shape"), nlohmann::json({512, 128}));
  // Same seed, same bytes.
  const std::string again = path + ".2";
  ASSERT_EQ(run({"weights", "--config", "tiny", "--seed", "1", "--out", again}).code, kExitOk);
  std::ifstream in2(again, std::ios::binary);
  std::string bytes2((std::istreambuf_iterator<char>(in2)), std::istreambuf_iterator<char>());
  EXPECT_TRUE(bytes == bytes2);
}

TEST(Cli, WeightsToAnUnwritablePathIsBadInput) {
  const Result r = run({"weights", "--config", "micro", "--seed", "1", "--out", "/no/such/dir/w.safetensors"});
  EXPECT_EQ(r.code, kExitBadInput);
  EXPECT_TRUE(contains(r.err, "/no/such/dir/w.safetensors")) << r.err;
}

}  // namespace
}  // namespace dsv4::cli

namespace dsv4::cli {
namespace {

TEST(CliReference, SameInputSameOutputEveryRun) {
  const std::vector<std::string> args = {"reference", "--config", "micro", "--seed", "3", "--prompt-len", "20",
                                         "--decode", "5", "--mode", "quant-sim", "--mtp"};
  const Result a = run(args);
  const Result b = run(args);
  ASSERT_EQ(a.code, kExitOk) << a.err;
  EXPECT_EQ(a.out, b.out);
  EXPECT_TRUE(contains(a.out, "tokens: "));
  EXPECT_TRUE(contains(a.out, "logits digest: "));
  EXPECT_TRUE(contains(a.out, "mtp drafts: "));
  const Result exact = run({"reference", "--config", "micro", "--seed", "3", "--prompt-len", "20", "--decode", "5"});
  ASSERT_EQ(exact.code, kExitOk);
  EXPECT_NE(exact.out, a.out);
}

TEST(CliReference, BadInputsAreNamed) {
  Result r = run({"reference", "--config", "micro", "--seed", "1", "--prompt-len", "0"});
  EXPECT_EQ(r.code, kExitBadInput);
  EXPECT_TRUE(contains(r.err, "--prompt-len"));
  r = run({"reference", "--config", "micro", "--seed", "1", "--prompt-len", "250", "--decode", "10"});
  EXPECT_EQ(r.code, kExitBadInput);
  EXPECT_TRUE(contains(r.err, "max_seq_len"));
  r = run({"reference", "--config", "micro", "--seed", "1", "--prompt-len", "4", "--mode", "fast"});
  EXPECT_EQ(r.code, kExitBadInput);
  EXPECT_TRUE(contains(r.err, "--mode"));
  r = run({"reference", "--config", "micro", "--seed", "1", "--prompt-len", "4", "--weights", "/no/such.safetensors"});
  EXPECT_EQ(r.code, kExitBadInput);
  EXPECT_TRUE(contains(r.err, "/no/such.safetensors"));
}

TEST(CliReference, ReadsWeightsFromACheckpoint) {
  const std::string path = ::testing::TempDir() + "/dsv4_cli_micro.safetensors";
  ASSERT_EQ(run({"weights", "--config", "micro", "--seed", "4", "--out", path}).code, kExitOk);
  const Result from_file = run({"reference", "--config", "micro", "--seed", "4", "--prompt-len", "9", "--weights", path});
  const Result synthetic = run({"reference", "--config", "micro", "--seed", "4", "--prompt-len", "9"});
  ASSERT_EQ(from_file.code, kExitOk) << from_file.err;
  const auto digest = [](const std::string& out) { return out.substr(out.find("logits digest")); };
  EXPECT_EQ(digest(from_file.out), digest(synthetic.out));
  // A checkpoint of another config is refused, naming the file and a tensor.
  const Result wrong = run({"reference", "--config", "tiny", "--seed", "4", "--prompt-len", "9", "--weights", path});
  EXPECT_EQ(wrong.code, kExitBadInput);
  EXPECT_TRUE(contains(wrong.err, path));
}

}  // namespace
}  // namespace dsv4::cli
