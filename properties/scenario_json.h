// The Scenario's and the Verdict's JSON form (docs/design.md: a Scenario serializes to JSON and back
// without loss). Field names are the structs' member names. Parsing is strict, because a case file
// that is misread replays a different case: every error is an InputError naming the source and the
// JSON path ("$.engine.requests[2].prompt[0]"), and unknown keys, wrong types and out-of-range
// integers are refused. Only `suite` (and a verdict's `kind`) is required; other fields default.
#pragma once

#include <concepts>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/core/error.h"
#include "properties/scenario.h"
#include "properties/verdict.h"

namespace dsv4::props {

// Every field is written; an optional section (engine, view, translation, conversion) only when set.
nlohmann::json scenario_to_json(const Scenario& scenario);
// json_path: where `j` sits in its document, so that errors inside an embedding file name full paths.
Scenario scenario_from_json(const nlohmann::json& j, const std::string& source,
                            const std::string& json_path = "$");

// {"kind": "race", "signature": "...", "detail": "..."}; `kind` is required when reading, so that a
// verdict without one is never read as a pass.
nlohmann::json verdict_to_json(const Verdict& verdict);
Verdict verdict_from_json(const nlohmann::json& j, const std::string& source,
                          const std::string& json_path = "$");

// The field-table machinery behind both forms, shared with case_file.cpp. A struct's JSON form is a
// table of Field entries; adding a member means adding one `member("name", &T::name)` line.
namespace json_fields {

using json = nlohmann::json;

// "$.a" + "b" -> "$.a.b"; keys that are not identifiers are quoted: "$.a[\"odd key\"]".
std::string key_path(const std::string& parent, const std::string& key);
std::string index_path(const std::string& parent, size_t index);
// A short description of a value for error messages: "a string \"x\"", "a float 1.5", "null".
std::string describe(const json& v);

// Codec<T>: how one C++ type is written and strictly read. The primary template serves structs
// with a field table (field_table<T>, specialized next to the struct's table).
template <class T>
struct Codec;

template <class T>
struct Field {
  std::string name;
  bool required = false;
  // Sets out[name], or leaves it out (an absent optional section).
  std::function<void(const T& in, json& out)> write;
  std::function<void(const json& v, const std::string& path, const std::string& source, T& out)> read;
};

template <class T>
const std::vector<Field<T>>& field_table();

template <class T>
struct is_optional : std::false_type {};
template <class E>
struct is_optional<std::optional<E>> : std::true_type {};

// The field `name` stored in `ptr`; an std::optional member is written only when it holds a value.
template <class T, class M>
Field<T> member(std::string name, M T::*ptr, bool required = false) {
  Field<T> f;
  f.name = name;
  f.required = required;
  if constexpr (is_optional<M>::value) {
    using E = typename M::value_type;
    f.write = [name, ptr](const T& in, json& out) {
      if ((in.*ptr).has_value()) out[name] = Codec<E>::write(*(in.*ptr));
    };
    f.read = [ptr](const json& v, const std::string& path, const std::string& source, T& out) {
      E value{};  // absent fields of the section keep the struct's defaults
      Codec<E>::read(v, path, source, value);
      out.*ptr = std::move(value);
    };
  } else {
    f.write = [name, ptr](const T& in, json& out) { out[name] = Codec<M>::write(in.*ptr); };
    f.read = [ptr](const json& v, const std::string& path, const std::string& source, T& out) {
      Codec<M>::read(v, path, source, out.*ptr);
    };
  }
  return f;
}

template <class T>
json write_object(const T& in, const std::vector<Field<T>>& table) {
  json out = json::object();
  for (const auto& f : table) f.write(in, out);
  return out;
}

std::string known_keys(const std::vector<std::string>& names);

// Reads `v` into `out` field by field: refuses a non-object, a missing required key and any key the
// table does not know (listing the known ones, so that a typo is easy to see).
template <class T>
void read_object(const json& v, const std::string& path, const std::string& source,
                 const std::vector<Field<T>>& table, T& out) {
  if (!v.is_object()) throw InputError(source, path, "must be an object, got " + describe(v));
  for (const auto& f : table) {
    if (f.required && !v.contains(f.name)) throw InputError(source, key_path(path, f.name), "missing required key");
  }
  for (const auto& [key, value] : v.items()) {
    const Field<T>* field = nullptr;
    for (const auto& f : table) {
      if (f.name == key) field = &f;
    }
    if (field == nullptr) {
      std::vector<std::string> names;
      for (const auto& f : table) names.push_back(f.name);
      throw InputError(source, key_path(path, key), "unknown key (known keys: " + known_keys(names) + ")");
    }
    field->read(value, key_path(path, key), source, out);
  }
}

template <class T>
struct Codec {
  static json write(const T& in) { return write_object(in, field_table<T>()); }
  static void read(const json& v, const std::string& path, const std::string& source, T& out) {
    read_object(v, path, source, field_table<T>(), out);
  }
};

template <>
struct Codec<std::string> {
  static json write(const std::string& in) { return in; }
  static void read(const json& v, const std::string& path, const std::string& source, std::string& out) {
    if (!v.is_string()) throw InputError(source, path, "must be a string, got " + describe(v));
    out = v.get<std::string>();
  }
};

template <>
struct Codec<bool> {
  static json write(bool in) { return in; }
  static void read(const json& v, const std::string& path, const std::string& source, bool& out) {
    if (!v.is_boolean()) throw InputError(source, path, "must be true or false, got " + describe(v));
    out = v.get<bool>();
  }
};

// "int32", "uint64", ... for messages.
template <std::integral T>
std::string integer_type_name() {
  return std::string(std::is_signed_v<T> ? "int" : "uint") + std::to_string(8 * sizeof(T));
}

// Integers of any width: a JSON integer that fits T exactly. Floats (even 2.0) and booleans are
// refused, so that a value the writer never produced is not silently rounded or converted.
template <class T>
  requires(std::integral<T> && !std::same_as<T, bool>)
struct Codec<T> {
  static json write(T in) { return in; }
  static void read(const json& v, const std::string& path, const std::string& source, T& out) {
    const std::string range = integer_type_name<T>() + " (" + std::to_string(std::numeric_limits<T>::min()) +
                              ".." + std::to_string(std::numeric_limits<T>::max()) + ")";
    if (v.is_number_unsigned()) {
      const auto u = v.get<uint64_t>();
      if (!std::in_range<T>(u)) throw InputError(source, path, "out of range for " + range + ": " + v.dump());
      out = static_cast<T>(u);
    } else if (v.is_number_integer()) {
      const auto i = v.get<int64_t>();
      if (!std::in_range<T>(i)) {
        throw InputError(source, path,
                         std::is_unsigned_v<T> && i < 0
                             ? "must not be negative (" + integer_type_name<T>() + "), got " + v.dump()
                             : "out of range for " + range + ": " + v.dump());
      }
      out = static_cast<T>(i);
    } else {
      throw InputError(source, path, "must be an integer (" + integer_type_name<T>() + "), got " + describe(v));
    }
  }
};

template <class E>
struct Codec<std::vector<E>> {
  static json write(const std::vector<E>& in) {
    json out = json::array();
    for (const auto& e : in) out.push_back(Codec<E>::write(e));
    return out;
  }
  static void read(const json& v, const std::string& path, const std::string& source, std::vector<E>& out) {
    if (!v.is_array()) throw InputError(source, path, "must be a list, got " + describe(v));
    out.clear();
    out.reserve(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      E e{};
      Codec<E>::read(v[i], index_path(path, i), source, e);
      out.push_back(std::move(e));
    }
  }
};

// The tables of scenario.h's and verdict.h's structs (defined in scenario_json.cpp), declared here so
// that a Codec of one of them used elsewhere links to them instead of instantiating the primary.
template <> const std::vector<Field<RequestSpec>>& field_table<RequestSpec>();
template <> const std::vector<Field<EngineSpec>>& field_table<EngineSpec>();
template <> const std::vector<Field<ViewSpec>>& field_table<ViewSpec>();
template <> const std::vector<Field<TranslationSpec>>& field_table<TranslationSpec>();
template <> const std::vector<Field<ConversionSpec>>& field_table<ConversionSpec>();
template <>
const std::vector<Field<ScheduleSpec>>& field_table<ScheduleSpec>();
template <> const std::vector<Field<Scenario>>& field_table<Scenario>();
template <> const std::vector<Field<Verdict>>& field_table<Verdict>();

}  // namespace json_fields
}  // namespace dsv4::props
