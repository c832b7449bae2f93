#include "properties/scenario_json.h"

#include <algorithm>
#include <cctype>

namespace dsv4::props {
namespace json_fields {

namespace {

bool is_identifier(const std::string& key) {
  if (key.empty() || !(std::isalpha(static_cast<unsigned char>(key[0])) || key[0] == '_')) return false;
  return std::all_of(key.begin(), key.end(),
                     [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; });
}

// Never throws on invalid UTF-8: an error message must not turn into a second error.
std::string safe_dump(const json& v) { return v.dump(-1, ' ', false, json::error_handler_t::replace); }

}  // namespace

std::string key_path(const std::string& parent, const std::string& key) {
  if (is_identifier(key)) return parent + "." + key;
  return parent + "[" + safe_dump(json(key)) + "]";
}

std::string index_path(const std::string& parent, size_t index) {
  return parent + "[" + std::to_string(index) + "]";
}

std::string describe(const json& v) {
  std::string text = safe_dump(v);
  if (text.size() > 60) text = text.substr(0, 57) + "...";
  switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "a boolean " + text;
    case json::value_t::string: return "a string " + text;
    case json::value_t::number_float: return "a float " + text;
    case json::value_t::number_integer:
    case json::value_t::number_unsigned: return "an integer " + text;
    case json::value_t::array: return "a list " + text;
    case json::value_t::object: return "an object " + text;
    default: return text;
  }
}

std::string known_keys(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

// A verdict kind is written by name ("contract-error"), the form the reports and the CLI use.
template <>
struct Codec<VerdictKind> {
  static json write(VerdictKind in) { return verdict_kind_name(in); }
  static void read(const json& v, const std::string& path, const std::string& source, VerdictKind& out) {
    if (!v.is_string()) throw InputError(source, path, "must be a verdict kind (a string), got " + describe(v));
    if (!parse_verdict_kind(v.get<std::string>(), out)) {
      std::vector<std::string> names;
      for (int k = 0; k <= static_cast<int>(VerdictKind::bad_input); ++k) {
        names.push_back(verdict_kind_name(static_cast<VerdictKind>(k)));
      }
      throw InputError(source, path, "unknown verdict kind " + safe_dump(v) + " (known kinds: " + known_keys(names) + ")");
    }
  }
};

// The field tables. To add a member to a struct of scenario.h, add its line here; the round-trip
// test's full scenario must then set it to a non-default value (FullScenarioSetsEveryField checks).
template <>
const std::vector<Field<RequestSpec>>& field_table<RequestSpec>() {
  static const std::vector<Field<RequestSpec>> table = {
      member("id", &RequestSpec::id),
      member("prompt", &RequestSpec::prompt),
      member("arrival_step", &RequestSpec::arrival_step),
      member("max_new_tokens", &RequestSpec::max_new_tokens),
  };
  return table;
}

template <>
const std::vector<Field<EngineSpec>>& field_table<EngineSpec>() {
  static const std::vector<Field<EngineSpec>> table = {
      member("config", &EngineSpec::config),
      member("weight_seed", &EngineSpec::weight_seed),
      member("quant", &EngineSpec::quant),
      member("requests", &EngineSpec::requests),
      member("backend", &EngineSpec::backend),
      member("page_size", &EngineSpec::page_size),
      member("swa_page_size", &EngineSpec::swa_page_size),
      member("c4_ring_size", &EngineSpec::c4_ring_size),
      member("c128_ring_size", &EngineSpec::c128_ring_size),
      member("batch_buckets", &EngineSpec::batch_buckets),
      member("max_running_requests", &EngineSpec::max_running_requests),
      member("chunked_prefill_tokens", &EngineSpec::chunked_prefill_tokens),
      member("pp_partition", &EngineSpec::pp_partition),
      member("cp", &EngineSpec::cp),
      member("graphs", &EngineSpec::graphs),
      member("multi_stream", &EngineSpec::multi_stream),
      member("mtp", &EngineSpec::mtp),
      member("draft_tokens", &EngineSpec::draft_tokens),
      member("indexer_sms", &EngineSpec::indexer_sms),
      member("schedule", &EngineSpec::schedule),
  };
  return table;
}

template <>
const std::vector<Field<ViewSpec>>& field_table<ViewSpec>() {
  static const std::vector<Field<ViewSpec>> table = {
      member("op", &ViewSpec::op),
      member("tokens", &ViewSpec::tokens),
      member("layout", &ViewSpec::layout),
      member("pad", &ViewSpec::pad),
      member("seed", &ViewSpec::seed),
  };
  return table;
}

template <>
const std::vector<Field<TranslationSpec>>& field_table<TranslationSpec>() {
  static const std::vector<Field<TranslationSpec>> table = {
      member("swa_page_size", &TranslationSpec::swa_page_size),
      member("ring_size", &TranslationSpec::ring_size),
      member("ratio", &TranslationSpec::ratio),
      member("swa_page_count", &TranslationSpec::swa_page_count),
      member("swa_locs", &TranslationSpec::swa_locs),
  };
  return table;
}

template <>
const std::vector<Field<ConversionSpec>>& field_table<ConversionSpec>() {
  static const std::vector<Field<ConversionSpec>> table = {
      member("format", &ConversionSpec::format),
      member("inputs", &ConversionSpec::inputs),
  };
  return table;
}

template <>
const std::vector<Field<ScheduleSpec>>& field_table<ScheduleSpec>() {
  static const std::vector<Field<ScheduleSpec>> table = {
      member("context_lens", &ScheduleSpec::context_lens),
      member("rows", &ScheduleSpec::rows),
      member("next_n", &ScheduleSpec::next_n),
      member("layout", &ScheduleSpec::layout),
      member("block_kv", &ScheduleSpec::block_kv),
      member("num_sms", &ScheduleSpec::num_sms),
  };
  return table;
}

template <>
const std::vector<Field<Scenario>>& field_table<Scenario>() {
  static const std::vector<Field<Scenario>> table = {
      member("suite", &Scenario::suite, /*required=*/true),
      member("engine", &Scenario::engine),
      member("expect_field", &Scenario::expect_field),
      member("view", &Scenario::view),
      member("translation", &Scenario::translation),
      member("conversion", &Scenario::conversion),
      member("schedule_case", &Scenario::schedule_case),
      member("faults", &Scenario::faults),
  };
  return table;
}

template <>
const std::vector<Field<Verdict>>& field_table<Verdict>() {
  static const std::vector<Field<Verdict>> table = {
      member("kind", &Verdict::kind, /*required=*/true),
      member("signature", &Verdict::signature),
      member("detail", &Verdict::detail),
  };
  return table;
}

}  // namespace json_fields

nlohmann::json scenario_to_json(const Scenario& scenario) {
  return json_fields::Codec<Scenario>::write(scenario);
}

Scenario scenario_from_json(const nlohmann::json& j, const std::string& source, const std::string& json_path) {
  Scenario out;
  json_fields::Codec<Scenario>::read(j, json_path, source, out);
  return out;
}

nlohmann::json verdict_to_json(const Verdict& verdict) { return json_fields::Codec<Verdict>::write(verdict); }

Verdict verdict_from_json(const nlohmann::json& j, const std::string& source, const std::string& json_path) {
  Verdict out;
  json_fields::Codec<Verdict>::read(j, json_path, source, out);
  return out;
}

}  // namespace dsv4::props
