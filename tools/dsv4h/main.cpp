#include <iostream>

#include "tools/dsv4h/cli.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  return dsv4::cli::run_cli(args, std::cout, std::cerr);
}
