#include "tools/dsv4h/cli.h"

#include <exception>

#include "engine/core/error.h"

namespace dsv4::cli {

namespace {

struct Command {
  const char* name;
  const char* summary;
  int (*run)(const std::vector<std::string>&, std::ostream&);
  const char* arrives_with;  // for commands whose implementation has not landed yet
};

const std::vector<Command>& commands() {
  static const std::vector<Command> table = {
      {"info", "print the validated config: per-layer ratios, parameter count, cache bytes per token", cmd_info, nullptr},
      {"weights", "write deterministic synthetic weights in the official checkpoint naming and dtypes", cmd_weights,
       nullptr},
      {"reference", "run the scalar reference alone: greedy tokens and a logits digest", cmd_reference, nullptr},
      {"generate", "run the engine as an inference engine and compare with the reference", cmd_generate, nullptr},
      {"check", "the main job: run every property suite within a budget and save failures as case files", cmd_check,
       nullptr},
      {"replay", "re-run one recorded case exactly and print its verdict and first divergence", cmd_replay, nullptr},
      {"shrink", "minimize a failing case while it keeps failing the same way", cmd_shrink, nullptr},
      {"mutants", "run the properties against every registered fault and report detection", cmd_mutants, nullptr},
  };
  return table;
}

std::string help_text() {
  std::string out =
      "dsv4h: correctness and fault-reproduction harness for DeepSeek-V4 inference\n\n"
      "usage: dsv4h COMMAND [flags]   (dsv4h COMMAND --help for its flags)\n\ncommands:\n";
  for (const auto& c : commands()) {
    std::string name = c.name;
    out += "  " + name + std::string(12 - name.size(), ' ') + c.summary;
    if (c.run == nullptr) out += std::string(" [not in this build yet: arrives with ") + c.arrives_with + "]";
    out += "\n";
  }
  out +=
      "\nexit codes: 0 all passed, 1 a check failed (a real finding), 2 bad input or usage\n"
      "configs: a preset (flash, pro, small, tiny, micro) or a config.json in the inference demo's or\n"
      "Hugging Face's naming\n";
  return out;
}

}  // namespace

int run_cli(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    (args.empty() ? err : out) << help_text();
    return args.empty() ? kExitBadInput : kExitOk;
  }
  const std::string& name = args[0];
  const std::vector<std::string> rest(args.begin() + 1, args.end());
  for (const auto& c : commands()) {
    if (name != c.name) continue;
    if (c.run == nullptr) {
      err << "dsv4h " << name << ": not in this build yet; it arrives with " << c.arrives_with
          << ". Available now: info, weights, reference, generate, check, replay, shrink, mutants.\n";
      return kExitBadInput;
    }
    try {
      return c.run(rest, out);
    } catch (const InputError& e) {
      err << "dsv4h " << name << ": " << e.what() << "\n";
      return kExitBadInput;
    }
  }
  err << "dsv4h: unknown command '" << name << "' (see dsv4h --help)\n";
  return kExitBadInput;
}

}  // namespace dsv4::cli
