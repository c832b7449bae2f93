#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <iostream>
#include <sstream>

#include "engine/core/error.h"
#include "engine/faults/faults.h"
#include "engine/model/serving_engine.h"
#include "engine/model/workload.h"
#include "engine/oracle/oracle.h"
#include "engine/runtime/hazard_detector.h"
#include "engine/runtime/backend.h"
#include "engine/runtime/sim_runtime.h"
#include "reference/weights.h"
#include "tools/dsv4h/cli.h"
#include "tools/dsv4h/cli_args.h"

namespace dsv4::cli {

namespace {

std::string join_ids(const std::vector<int32_t>& ids, size_t limit) {
  std::string out;
  for (size_t i = 0; i < ids.size() && i < limit; ++i) out += (out.empty() ? "" : " ") + std::to_string(ids[i]);
  if (ids.size() > limit) out += " ...";
  return out;
}

bool parse_on_off(const std::string& flag, const std::string& value) {
  if (value == "on") return true;
  if (value == "off") return false;
  throw InputError(flag, "", "expects on or off, got '" + value + "'");
}

}  // namespace

int cmd_generate(const std::vector<std::string>& argv, std::ostream& out) {
  const std::vector<FlagSpec> flags = {
      {"--config", "NAME|PATH", "config preset or config.json", true},
      {"--backend", "sim|cuda|auto", "where the engine runs (default sim; auto: cuda if a GPU is present)", false},
      {"--seed", "S", "weight seed for synthetic weights (default 1)", false},
      {"--weights", "F.safetensors", "read the weights from a checkpoint instead of generating them", false},
      {"--prompt-seed", "S", "seed of the synthetic prompts (default 1)", false},
      {"--requests", "N", "requests in the standard mix (default 8)", false},
      {"--decode", "K", "decode steps per request after its prefill (default 32)", false},
      {"--graph", "", "run DECODE batches as graphs captured per batch-size bucket", false},
      {"--multi-stream", "on|off", "overlap the kv, compressor and indexer work on alt streams (default on)", false},
      {"--schedule", "S", "sim stream interleaving: in-order, random:SEED, pct:SEED:DEPTH, delay:STREAM:OPS", false},
      {"--pp", "N", "pipeline-parallel stages, one simulated device each (default 1; vLLM's default split)", false},
      {"--pp-partition", "a,b,...", "layers per stage, in order (sets the stage count)", false},
      {"--quant", "fp8|w8a8-int8", "quantized linears: FP8 block-scaled (default) or per-channel int8 with per-token int8 activations", false},
      {"--mtp", "", "speculative decoding with the MTP block's drafts (EAGLE, greedy acceptance); the drafts are compared with the reference's MTP block at every step", false},
      {"--draft-tokens", "N", "with --mtp: draft tokens per step, 1 to 4 (default 1, as sglang runs it; more than 1 drafts with the EAGLE chain)", false},
      {"--draft-extend", "v1|v2", "with --mtp: the MTP block over the verified tokens inside the verify batch (v2, the overlap scheduler's DRAFT_EXTEND_V2; default) or as its own forward over the accepted tokens (v1, DRAFT_EXTEND)", false},
      {"--cp", "N", "prefill context-parallel ranks, one device each (a GPU per rank on cuda; default 1)", false},
      {"--indexer-sms", "N", "blocks of the persistent indexer-logits kernel (default 4)", false},
      {"--guards", "", "testing allocator: guard bytes and poison on every buffer, checked at the end", false},
      {"--compare-reference", "", "compare every step with the scalar reference (tolerances, tie-aware decisions)", false},
      {"--no-resync", "", "with --compare-reference: chain the reference's own layers instead of feeding each layer the engine's residual (the tolerances assume resync)", false},
      {"--op-table", "", "with --compare-reference: also print the largest error per op", false},
      {"--faults", "a,b,...", "inject registered faults (dsv4h mutants --list names them)", false},
  };
  const Args args("generate", argv, flags, /*runtime=*/true);
  if (args.help()) {
    out << usage("generate",
                 "--config tiny|micro [--backend sim|cuda|auto] [--graph] [--multi-stream on|off] [--schedule S] "
                 "[--compare-reference]",
                 flags, true);
    return kExitOk;
  }
  if (!args.positionals().empty()) throw InputError(args.positionals()[0], "", "unexpected argument");
  const rt::BackendKind backend = rt::parse_backend(args.optional_str("--backend").value_or("sim"), "--backend");
  const ModelConfig config = load_model_config(args.str("--config"));
  const uint64_t seed = args.has("--seed") ? args.u64("--seed") : 1;
  const uint64_t prompt_seed = args.has("--prompt-seed") ? args.u64("--prompt-seed") : 1;
  const int64_t count = args.i64("--requests", 8);
  const int64_t decode = args.i64("--decode", 32);
  RuntimeOptions options = args.runtime();
  engine::EngineOptions eo;
  eo.graphs = args.has("--graph");
  eo.multi_stream = parse_on_off("--multi-stream", args.optional_str("--multi-stream").value_or("on"));
  eo.indexer_sms = args.i64("--indexer-sms", 4);
  if (eo.indexer_sms < 1) throw InputError("--indexer-sms", "", "must be >= 1");
  if (args.has("--pp-partition")) {
    for (const std::string& item : split_list(args.str("--pp-partition"), "--pp-partition")) {
      char* endp = nullptr;
      const long long v = std::strtoll(item.c_str(), &endp, 10);
      if (*endp != '\0') throw InputError("--pp-partition", "", "expects comma-separated layer counts, got '" + item + "'");
      eo.pp_partition.push_back(v);
    }
    engine::validate_pp_partition(eo.pp_partition, config.n_layers, "--pp-partition");
    if (args.has("--pp") && args.i64("--pp", 1) != static_cast<int64_t>(eo.pp_partition.size())) {
      throw InputError("--pp", "", "disagrees with --pp-partition's " + std::to_string(eo.pp_partition.size()) + " stages");
    }
  } else if (args.has("--pp")) {
    eo.pp_partition = engine::default_pp_partition(config.n_layers, args.i64("--pp", 1));
  }
  eo.cp = args.i64("--cp", 1);
  const std::string quant = args.optional_str("--quant").value_or("fp8");
  if (quant != "fp8" && quant != "w8a8-int8") throw InputError("--quant", "", "expects fp8 or w8a8-int8, got '" + quant + "'");
  eo.w8a8_int8 = quant == "w8a8-int8";
  eo.mtp = args.has("--mtp");
  if (args.has("--draft-tokens") && !eo.mtp) throw InputError("--draft-tokens", "", "needs --mtp");
  if (args.has("--draft-extend") && !eo.mtp) throw InputError("--draft-extend", "", "needs --mtp");
  eo.draft_tokens = eo.mtp ? args.i64("--draft-tokens", 1) : 0;
  if (eo.mtp && (eo.draft_tokens < 1 || eo.draft_tokens > 4)) {
    throw InputError("--draft-tokens", "", "must be in [1, 4], got " + std::to_string(eo.draft_tokens));
  }
  const std::string draft_extend = args.optional_str("--draft-extend").value_or("v2");
  if (draft_extend != "v1" && draft_extend != "v2") {
    throw InputError("--draft-extend", "", "expects v1 or v2, got '" + draft_extend + "'");
  }
  eo.draft_extend = draft_extend == "v1" ? engine::DraftExtend::v1 : engine::DraftExtend::v2;
  if (eo.draft_tokens > 0) options.speculative = true;  // the larger rings keep drafts off committed state
  if (eo.cp < 1) throw InputError("--cp", "", "must be >= 1");
  std::vector<faults::Fault> injected;
  if (args.has("--faults")) {
    for (const std::string& name : split_list(args.str("--faults"), "--faults")) injected.push_back(faults::parse(name, "--faults", ""));
  }
  const faults::ScopedFaults fault_scope(injected);
  const bool compare = args.has("--compare-reference");
  eo.probes = compare;
  rt::SimOptions sim;
  sim.schedule = rt::Schedule::parse(args.optional_str("--schedule").value_or("in-order"));
  const std::vector<engine::WorkloadRequest> workload = engine::standard_workload(config, prompt_seed, count, decode);
  // Room for every request at once unless the user chose otherwise.
  const bool user_set_running = std::find(argv.begin(), argv.end(), "--max-running-requests") != argv.end();
  if (!user_set_running) options.max_running_requests = std::min<int64_t>(count, options.max_running_requests);
  if (std::find(argv.begin(), argv.end(), "--batch-buckets") == argv.end()) {
    // Buckets up to the running limit, the limit itself included, so every decode batch has one.
    std::vector<int64_t> buckets;
    for (int64_t b : options.batch_buckets) {
      if (b < options.max_running_requests) buckets.push_back(b);
    }
    buckets.push_back(options.max_running_requests);
    options.batch_buckets = buckets;
  }
  validate_runtime_options(options, config, "flags");

  const CheckpointSource source =
      args.has("--weights") ? CheckpointSource::file(args.str("--weights")) : CheckpointSource::synthetic(config, seed);
  rt::RuntimeOptions ro;
  ro.devices = std::max<int>({1, static_cast<int>(eo.pp_partition.size()), static_cast<int>(eo.cp)});
  if (args.has("--guards")) {
    ro.allocator_mode = AllocatorMode::testing;
    ro.caching_allocator = false;
  }
  const std::unique_ptr<rt::Runtime> runtime_owner = rt::make_runtime(backend, ro, sim);
  rt::Runtime& runtime = *runtime_owner;
  rt::HazardDetector hazards;
  runtime.add_observer(&hazards);

  const auto t0 = std::chrono::steady_clock::now();
  engine::ServingEngine engine(runtime, config, options, source, eo);
  for (const auto& r : workload) engine.add_request(r.id, r.prompt_ids, r.max_new_tokens, r.arrival_step);
  std::unique_ptr<ref::Weights> ref_weights;
  std::unique_ptr<engine::ReferenceOracle> oracle;
  if (compare) {
    ref_weights = std::make_unique<ref::Weights>(args.has("--weights") ? ref::Weights::from_file(config, args.str("--weights"))
                                                                        : ref::Weights::synthetic(config, seed));
    engine::OracleTolerances tolerances;
    tolerances.resync_layers = !args.has("--no-resync");
    ref::Numerics numerics{ref::Mode::quant_sim};
    if (eo.w8a8_int8) numerics.linear = ref::LinearQuant::w8a8_int8;
    oracle = std::make_unique<engine::ReferenceOracle>(config, *ref_weights, numerics, tolerances);
    for (const auto& r : workload) oracle->add_request(r.id, r.prompt_ids);
  }

  out << "config " << config.source << ", weights " << source.description() << ", backend " << rt::backend_name(backend);
  if (backend == rt::BackendKind::sim) out << ", schedule " << sim.schedule.str();
  out << ", graph " << (eo.graphs ? "on" : "off") << ", multi-stream "
      << (eo.multi_stream ? "on" : "off");
  if (!eo.pp_partition.empty()) {
    out << ", pp " << eo.pp_partition.size() << " (";
    for (size_t i = 0; i < eo.pp_partition.size(); ++i) out << (i ? "," : "") << eo.pp_partition[i];
    out << ")";
  }
  if (eo.cp > 1) out << ", cp " << eo.cp;
  out << ", quant " << quant;
  if (eo.mtp) {
    out << ", mtp (" << eo.draft_tokens << " draft token" << (eo.draft_tokens == 1 ? "" : "s") << ", draft extend "
        << draft_extend << ")";
  }
  out << "\n";
  int64_t extend_steps = 0, decode_steps = 0, drafts_verified = 0, drafts_accepted = 0;
  std::string finding;
  try {
    const int64_t step_limit = 100000;
    while (engine.has_unfinished()) {
      if (engine.steps() >= step_limit) throw std::runtime_error("no progress after " + std::to_string(step_limit) + " steps");
      const engine::StepRecord rec = engine.step();
      extend_steps += rec.mode == serving::ForwardMode::extend;
      decode_steps += rec.mode == serving::ForwardMode::decode || rec.mode == serving::ForwardMode::target_verify;
      if (oracle) oracle->check(rec);
      for (const auto& row : rec.rows) {
        if (row.accepted_tokens < 0) continue;
        drafts_verified += row.num_tokens - 1;
        drafts_accepted += row.accepted_tokens - 1;
      }
    }
  } catch (const rt::HangError& e) {
    finding = std::string("hang: ") + e.what();
  } catch (const ContractError& e) {
    finding = std::string("contract-error: ") + e.what();
  }
  const auto t1 = std::chrono::steady_clock::now();

  out << "steps " << engine.steps() << " (" << extend_steps << " extend, " << decode_steps << " decode), graphs captured "
      << engine.graphs_captured() << ", graph replays " << engine.graph_replays() << ", metadata upgrades "
      << engine.metadata_upgrades();
  if (const auto* simulated = dynamic_cast<const rt::SimRuntime*>(&runtime)) out << ", sim ops " << simulated->ops_executed();
  out << "\n";
  if (eo.draft_tokens > 0) {
    char rate[96];
    std::snprintf(rate, sizeof rate, "speculative decoding: %lld of %lld drafts accepted (%.1f%%)\n",
                  static_cast<long long>(drafts_accepted), static_cast<long long>(drafts_verified),
                  drafts_verified > 0 ? 100.0 * static_cast<double>(drafts_accepted) / static_cast<double>(drafts_verified) : 0.0);
    out << rate;
  }
  if (oracle) {
    out << oracle->table();
    if (args.has("--op-table")) out << oracle->op_table();
  } else {
    out << "request  prompt  generated  tokens\n";
    for (const auto& r : workload) {
      const serving::Request& q = engine.request(r.id);
      char line[64];
      std::snprintf(line, sizeof line, "%7lld  %6lld  %9zu  ", static_cast<long long>(r.id),
                    static_cast<long long>(q.prompt_len()), q.generated_ids.size());
      out << line << join_ids(q.generated_ids, 12) << "\n";
    }
  }
  const std::vector<GuardDamage> damage = runtime.check_guards();
  out << "hazard detector: " << hazards.hazards().size() << " hazard(s)\n";
  for (size_t i = 0; i < hazards.hazards().size() && i < 5; ++i) out << "  " << hazards.hazards()[i].describe() << "\n";
  if (args.has("--guards")) out << "guards: " << damage.size() << " damaged buffer(s)\n";
  std::fprintf(stderr, "generate: %.2f s\n", std::chrono::duration<double>(t1 - t0).count());

  bool ok = finding.empty() && hazards.hazards().empty() && damage.empty();
  if (!finding.empty()) out << finding << "\n";
  if (oracle) {
    ok = ok && oracle->ok();
    if (auto d = oracle->first_divergence()) out << "first divergence: " << d->summary() << "\n";
  }
  out << "verdict: " << (ok ? "PASS" : "FAIL") << "\n";
  return ok ? kExitOk : kExitFinding;
}

}  // namespace dsv4::cli
