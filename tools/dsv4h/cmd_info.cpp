#include <cstdarg>
#include <cstdio>

#include "engine/checkpoint/checkpoint_layout.h"
#include "engine/config/cache_geometry.h"
#include "engine/config/model_config.h"
#include "engine/config/runtime_options.h"
#include "tools/dsv4h/cli.h"
#include "engine/core/error.h"
#include "tools/dsv4h/cli_args.h"

namespace dsv4::cli {

namespace {

std::string fmt(const char* format, ...) {
  char buffer[512];
  va_list ap;
  va_start(ap, format);
  std::vsnprintf(buffer, sizeof buffer, format, ap);
  va_end(ap);
  return buffer;
}

// Counts and sizes in the unit that keeps both the released models and the tiny ones readable.
std::string scaled(int64_t n, const char* unit) {
  const double v = static_cast<double>(n);
  if (v >= 1e9) return fmt("%.2f G%s", v / 1e9, unit);
  if (v >= 1e6) return fmt("%.2f M%s", v / 1e6, unit);
  if (v >= 1e3) return fmt("%.2f K%s", v / 1e3, unit);
  return fmt("%lld %s", static_cast<long long>(n), unit);
}
std::string billions(int64_t n) {
  return n >= 1000000000 ? fmt("%.2f B", static_cast<double>(n) / 1e9) : scaled(n, "");
}
std::string gigabytes(int64_t n) { return scaled(n, "B"); }

std::string describe_model(const ModelConfig& c) {
  std::string out;
  out += fmt("config        %s\n", c.source.c_str());
  out += fmt("model         vocab %lld, dim %lld, %lld layers + %lld MTP, max_seq_len %lld\n", (long long)c.vocab_size,
             (long long)c.dim, (long long)c.n_layers, (long long)c.n_mtp_layers, (long long)c.max_seq_len);
  out += fmt("attention     %lld heads x %lld (nope %lld + rope %lld), q_lora %lld, output %lld groups x %lld, window %lld\n",
             (long long)c.n_heads, (long long)c.head_dim, (long long)c.nope_head_dim(), (long long)c.rope_head_dim,
             (long long)c.q_lora_rank, (long long)c.o_groups, (long long)c.o_lora_rank, (long long)c.window_size);
  out += fmt("indexer       %lld heads x %lld, top-k %lld, %s q/k\n", (long long)c.index_n_heads,
             (long long)c.index_head_dim, (long long)c.index_topk, c.indexer_quant.c_str());
  out += fmt("moe           %lld routed (%lld active) + %lld shared, inter %lld, hash-routed layers < %lld, "
             "route_scale %g, swiglu_limit %g\n",
             (long long)c.n_routed_experts, (long long)c.n_activated_experts, (long long)c.n_shared_experts,
             (long long)c.moe_inter_dim, (long long)c.n_hash_layers, c.route_scale, c.swiglu_limit);
  out += fmt("mhc           %lld copies, %lld Sinkhorn iterations, hc_eps %g, norm_eps %g\n", (long long)c.hc_mult,
             (long long)c.hc_sinkhorn_iters, c.hc_eps, c.norm_eps);
  out += fmt("rope          theta %g on ratio-0 layers; %g with YaRN x%g from %lld (beta %g/%g) on compressed layers\n",
             c.rope_theta, c.compress_rope_theta, c.rope_factor, (long long)c.original_seq_len, c.beta_fast,
             c.beta_slow);
  out += fmt("quantization  weights %s (%lldx%lld %s scales), experts %s (1x%lld), activations 1x%lld, kv nope fp8 per %lld\n",
             c.weight_dtype.c_str(), (long long)c.weight_block_size, (long long)c.weight_block_size,
             c.scale_fmt.c_str(), c.expert_dtype.c_str(), (long long)c.fp4_block_size, (long long)c.act_block_size,
             (long long)c.kv_block_size);
  return out;
}

std::string describe_layers(const ModelConfig& c) {
  std::string out = "\nlayers\n  id  ratio  kind          routing  rope\n";
  int counts[3] = {0, 0, 0};
  for (int64_t l = 0; l < c.n_layers + c.n_mtp_layers; ++l) {
    const bool mtp = l >= c.n_layers;
    const LayerKind kind = c.kind(l);
    if (!mtp) ++counts[static_cast<int>(kind)];
    const std::string name = std::string(layer_kind_name(kind)) + (mtp ? " (mtp)" : "");
    const std::string rope = c.ratio(l) == 0 ? fmt("%g", c.rope_theta) : fmt("%g+yarn", c.compress_rope_theta);
    out += fmt("  %2lld  %5lld  %-12s  %-7s  %s\n", (long long)l, (long long)c.ratio(l), name.c_str(),
               c.is_hash_layer(l) ? "hash" : "score", rope.c_str());
  }
  out += fmt("  main layers: %d swa, %d c4+indexer, %d c128; mtp layers: %lld\n", counts[0], counts[1], counts[2],
             (long long)c.n_mtp_layers);
  return out;
}

std::string describe_parameters(const ModelConfig& c) {
  const ParameterCount p = count_parameters(c);
  std::string out = "\n";
  out += fmt("parameters    %s total (%s main + %s MTP); %s activated per token; routed experts %s\n",
             billions(p.total).c_str(), billions(p.total - p.mtp).c_str(), billions(p.mtp).c_str(),
             billions(p.activated).c_str(), billions(p.routed_experts).c_str());
  out += fmt("checkpoint    %s as stored (block scales %s)\n", gigabytes(p.stored_bytes).c_str(),
             gigabytes(p.scale_bytes).c_str());
  return out;
}

std::string describe_caches(const ModelConfig& c, const RuntimeOptions& o) {
  const CacheGeometry g = cache_geometry(c, o);
  int64_t all = 0, c4 = 0, c128 = 0;
  for (int64_t l = 0; l < c.n_layers + c.n_mtp_layers; ++l) {
    ++all;
    c4 += c.kind(l) == LayerKind::c4_indexed;
    c128 += c.kind(l) == LayerKind::c128_pooled;
  }
  std::string buckets;
  for (int64_t b : o.batch_buckets) buckets += (buckets.empty() ? "" : ",") + std::to_string(b);
  std::string out = "\n";
  out += fmt("runtime       page_size %lld, swa_page_size %lld, rings c4 %lld / c128 %lld%s, buckets %s, "
             "max_running_requests %lld, chunked_prefill_tokens %lld\n",
             (long long)o.page_size, (long long)o.swa_page_size, (long long)g.c4_ring_size, (long long)g.c128_ring_size,
             o.speculative ? " (speculative)" : "", buckets.c_str(), (long long)o.max_running_requests,
             (long long)o.chunked_prefill_tokens);
  out += "\ncache bytes per token\n";
  out += "  pool                          entry B  layers  tokens/entry  B per token\n";
  auto row = [&](const char* pool, int64_t entry, int64_t layers, double tokens_per_entry) {
    if (layers == 0) return;
    out += fmt("  %-28s %8lld  %6lld  %12g  %11.2f\n", pool, (long long)entry, (long long)layers, tokens_per_entry,
               static_cast<double>(entry * layers) / tokens_per_entry);
  };
  row("swa kv (window tokens only)", g.kv_entry_bytes, all, 1);
  row("c4 compressed kv", g.kv_entry_bytes, c4, 4);
  row("c4 indexer keys", g.indexer_key_bytes, c4, 4);
  if (c128 > 0) row("c128 compressed kv", g.kv_entry_bytes, c128, static_cast<double>(c.c128_ratio()));
  // Compress-state rows live per SWA page: ring_size rows for every swa_page_size cached tokens.
  const double per_swa_token_c4 = static_cast<double>(o.swa_page_size) / static_cast<double>(g.c4_ring_size);
  row("c4 compress state", g.c4_state_row_bytes, c4, per_swa_token_c4);
  row("c4 indexer compress state", g.indexer_state_row_bytes, c4, per_swa_token_c4);
  if (c128 > 0) {
    row("c128 compress state", g.c128_state_row_bytes, c128,
        static_cast<double>(o.swa_page_size) / static_cast<double>(g.c128_ring_size));
  }
  out += "  (swa kv and compress state are held for the window of each request; compressed kv and\n"
         "   indexer keys for its whole context)\n";
  return out;
}

}  // namespace

int cmd_info(const std::vector<std::string>& argv, std::ostream& out) {
  const std::vector<FlagSpec> flags = {
      {"--config", "NAME|PATH", "config preset (flash, pro, small, tiny, micro) or config.json", true},
  };
  const Args args("info", argv, flags, /*runtime=*/true);
  if (args.help()) {
    out << usage("info", "--config NAME|PATH [runtime options]", flags, true);
    return kExitOk;
  }
  if (!args.positionals().empty()) throw InputError(args.positionals()[0], "", "unexpected argument");
  const ModelConfig config = load_model_config(args.str("--config"));
  validate_runtime_options(args.runtime(), config, "runtime options");
  out << describe_model(config) << describe_layers(config) << describe_parameters(config)
      << describe_caches(config, args.runtime());
  return kExitOk;
}

}  // namespace dsv4::cli
