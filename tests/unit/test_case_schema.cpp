// repros/schema/case-v1.schema.json documents the case format for other tools; the loader is the
// field tables of properties/scenario_json.cpp. These tests keep the two in step (a field added to
// one and not the other fails here), and check the checked-in cases against the loader.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>

#include "properties/case_file.h"
#include "properties/scenario_json.h"

namespace dsv4::props {
namespace {

using json_fields::Field;
using json_fields::field_table;

const std::string kRepo = DSV4_SOURCE_DIR;

nlohmann::json schema() {
  std::ifstream in(kRepo + "/repros/schema/case-v1.schema.json");
  EXPECT_TRUE(in.good());
  return nlohmann::json::parse(in);
}

template <class T>
void expect_same_fields(const nlohmann::json& def, const std::string& what) {
  std::set<std::string> loader, documented, required_loader, required_documented;
  for (const Field<T>& f : field_table<T>()) {
    loader.insert(f.name);
    if (f.required) required_loader.insert(f.name);
  }
  for (const auto& [key, value] : def.at("properties").items()) documented.insert(key);
  for (const auto& r : def.at("required")) required_documented.insert(r.get<std::string>());
  EXPECT_EQ(loader, documented) << what;
  EXPECT_EQ(required_loader, required_documented) << what;
  EXPECT_FALSE(def.at("additionalProperties").get<bool>()) << what << ": unknown keys are refused";
}

TEST(CaseSchema, DocumentsEveryFieldTheLoaderReads) {
  const nlohmann::json s = schema();
  const nlohmann::json& defs = s.at("$defs");
  expect_same_fields<RequestSpec>(defs.at("request"), "request");
  expect_same_fields<EngineSpec>(defs.at("engine"), "engine");
  expect_same_fields<ViewSpec>(defs.at("view"), "view");
  expect_same_fields<TranslationSpec>(defs.at("translation"), "translation");
  expect_same_fields<ConversionSpec>(defs.at("conversion"), "conversion");
  expect_same_fields<ScheduleSpec>(defs.at("schedule_case"), "schedule_case");
  expect_same_fields<Scenario>(defs.at("scenario"), "scenario");
  expect_same_fields<Verdict>(defs.at("verdict"), "verdict");
  EXPECT_EQ(s.at("properties").at("version").at("const").get<int>(), kCaseFormatVersion);
}

TEST(CaseSchema, VerdictKindsAreTheLoadersKinds) {
  std::set<std::string> documented;
  const nlohmann::json s = schema();
  for (const auto& k : s.at("$defs").at("verdict").at("properties").at("kind").at("enum")) {
    documented.insert(k.get<std::string>());
  }
  std::set<std::string> known;
  for (VerdictKind k : {VerdictKind::pass, VerdictKind::mismatch, VerdictKind::contract_error, VerdictKind::race,
                        VerdictKind::hang, VerdictKind::crash, VerdictKind::bad_input}) {
    known.insert(verdict_kind_name(k));
  }
  EXPECT_EQ(documented, known);
}

TEST(CaseSchema, EveryCheckedInCaseLoads) {
  int cases = 0;
  for (const auto& entry : std::filesystem::directory_iterator(kRepo + "/repros/cases")) {
    if (entry.path().extension() != ".json") continue;
    const CaseFile c = read_case_file(entry.path().string());
    EXPECT_FALSE(c.verdict.passed()) << entry.path() << " records a failure";
    EXPECT_FALSE(c.scenario.faults.empty()) << entry.path() << " is a seed fault's case";
    ++cases;
  }
  EXPECT_GE(cases, 8);
}

}  // namespace
}  // namespace dsv4::props
