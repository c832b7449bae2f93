// dsv4h: the harness's command line. run_cli returns the exit code: 0 all passed, 1 a check failed
// (a real finding), 2 bad input or usage (the message names the file, field or flag).
#pragma once

#include <ostream>
#include <string>
#include <vector>

namespace dsv4::cli {

inline constexpr int kExitOk = 0;
inline constexpr int kExitFinding = 1;
inline constexpr int kExitBadInput = 2;

int run_cli(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

// Commands; each parses its own flags and throws InputError on bad input.
int cmd_info(const std::vector<std::string>& args, std::ostream& out);
int cmd_weights(const std::vector<std::string>& args, std::ostream& out);
int cmd_reference(const std::vector<std::string>& args, std::ostream& out);
int cmd_generate(const std::vector<std::string>& args, std::ostream& out);
int cmd_check(const std::vector<std::string>& args, std::ostream& out);
int cmd_mutants(const std::vector<std::string>& args, std::ostream& out);
int cmd_replay(const std::vector<std::string>& args, std::ostream& out);
int cmd_shrink(const std::vector<std::string>& args, std::ostream& out);

}  // namespace dsv4::cli
