// The DeepSeek-V4 model on the runtime (dsv4-model §0-§6, sglang's model runner): device weights,
// the paged caches and compress-state pools in runtime buffers, one batch's metadata in persistent
// device buffers, and the layer forward issued as launches with the byte ranges they touch.
//
// Streams (dsv4-model §6). With multi_stream on, each attention block forks five alt streams from
// the main stream after attn_norm: `kv` (fused norm+RoPE+FP8 store into the SWA cache, after
// qkv_a_ready), `compressor` (the attention compressor), `indexer` (the indexer's compressor, then
// its logits and top-k), `indexer_q` (the indexer query, after q_lora_ready and weights_ready) and
// `indexer_w` (weights_proj); main computes qkv_a, q_lora, then wq_b and the q norm+RoPE, joins all
// of them and runs the sparse attention. The MoE runs its shared expert on the `kv` stream while
// main runs the routed experts. With multi_stream off, the same launches run on main in that order.
//
// Metadata. Each batch's raw metadata (ForwardMetadata) is upgraded once, on the host, before any
// launch (bug class A2), and its full form (positions, SWA locations and window indices, compress
// plans with their state rows and cache locations, the indexer's (N_total, 1) context lengths,
// block table and persistent-kernel schedule, c128 entry indices) is written into persistent device
// buffers. Launches read those buffers when they run, so a captured graph replays a new batch once
// its values are copied in place (bug class A3: nothing is rebound).
//
// Graphs. With graphs on, a DECODE (or TARGET_VERIFY) batch runs as the graph captured for its
// (mode, bucket) (the first batch of one captures it), replayed with the batch's metadata assigned
// into that bucket's frozen ForwardMetadata and written into the same buffers; a verify batch's
// draft forward (DRAFT_EXTEND, the EAGLE chain) as the draft graph of its bucket.
//
// Beyond one rank and one path (docs/engine.md): pipeline stages (a runner per stage, driven by
// ServingEngine), prefill context parallelism (begin_cp), the w8a8-int8 linears, and the MTP block
// after every batch, with speculative decoding of its drafts: TARGET_VERIFY, DRAFT_EXTEND_V2 inside
// the verify batch or DRAFT_EXTEND as its own forward after it, the EAGLE chain for more than one
// draft token (draft()), and the scrub of what rejected drafts wrote into compressed state
// (scrub_rejected()).
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "engine/config/model_config.h"
#include "engine/config/runtime_options.h"
#include "engine/model/device_weights.h"
#include "engine/model/step_record.h"
#include "engine/runtime/runtime.h"
#include "engine/serving/compress_state_pool.h"
#include "engine/serving/forward_batch.h"
#include "engine/serving/forward_metadata.h"
#include "engine/serving/req_to_token_pool.h"
#include "engine/serving/swa_token_allocator.h"
#include "engine/serving/token_allocator.h"

namespace dsv4::engine {

// How the MTP block catches up with a verify batch (speculative decoding).
enum class DraftExtend {
  v1,  // DRAFT_EXTEND: a forward of its own after the verify batch, over the accepted tokens only
  v2,  // DRAFT_EXTEND_V2 (sglang's overlap scheduler): inside the verify batch, over every verified token
};

struct EngineOptions {
  bool multi_stream = true;  // the alt-stream overlap of dsv4-model §6
  bool graphs = false;       // DECODE batches as graphs captured per batch-size bucket
  bool probes = false;       // record every intermediate into the StepRecord (the oracle's input)
  int64_t indexer_sms = 4;   // blocks of the persistent indexer-logits kernel
  int device = 0;
  // Pipeline parallelism: the stage sizes (layers per rank, in order; empty = one stage with every
  // layer). Rank r runs on device r; the embedding lives on the first stage, the head (and the MTP
  // block) on the last.
  std::vector<int64_t> pp_partition;
  // Prefill context parallelism: EXTEND batches split round-robin over `cp` ranks (one device each:
  // a simulated one on sim, a GPU on cuda; every rank a whole model with its own full caches);
  // DECODE runs on rank 0.
  int64_t cp = 1;
  // The quantized linears: FP8 block-scaled (the checkpoint's) or w8a8-int8 (per-channel int8
  // weights requantized at load, dynamic per-token int8 activations).
  bool w8a8_int8 = false;
  // Run the MTP block after every batch (on the last stage): draft logits of each row's next-next
  // token, probed as "mtp.logits" and the MTP block's intermediates.
  bool mtp = false;
  // Speculative decoding with the MTP block's drafts (EAGLE, greedy acceptance): draft tokens per
  // step, 1 to 4 (sglang runs 1; 0 = off). DECODE becomes TARGET_VERIFY; the MTP block catches up
  // over the verified positions with the target's own tokens as next tokens (`draft_extend`), and
  // its prediction at the row's last kept position is the first draft; drafts 2..k come from the
  // EAGLE chain (the MTP block on its own output residual and its own previous draft).
  int64_t draft_tokens = 0;
  DraftExtend draft_extend = DraftExtend::v2;
  // Tests: false leaves in place the compressed entries and compress-state rows that rejected drafts
  // wrote (the scrub puts back what they overwrote after every verify batch).
  bool scrub_rejected = true;
};

// vLLM's default split (get_pp_indices): n_layers / pp each, the remainder spread one by one over
// the stages before the last (which carries the head). InputError (naming --pp) for pp outside
// [1, n_layers].
std::vector<int64_t> default_pp_partition(int64_t n_layers, int64_t pp);
// Checks an explicit partition: every stage non-empty, the sizes sum to n_layers. InputError naming
// `source` (e.g. "--pp-partition").
void validate_pp_partition(const std::vector<int64_t>& partition, int64_t n_layers, const std::string& source);

// Drops the probe rows of padding tokens (the oracle sees the real tokens only).
void trim_probes(StepRecord& record, int64_t real_tokens);

// The weights one PP stage holds: its layers, the embedding on the first, the final norm, hc_head,
// the head, the MTP block and (for the MTP block) the embedding on the last.
bool stage_holds_weight(const ModelConfig& config, int64_t layer_begin, int64_t layer_end, const std::string& name);

// A device tensor: the buffer it lives in and the kernel's view of it.
struct DeviceTensor {
  rt::BufferId buffer;
  Tensor t;
};

class ModelRunner {
 public:
  // The pools are the serving engine's; the runner reads them when it builds a batch's metadata.
  // InputError for options the engine cannot run (naming the field).
  ModelRunner(rt::Runtime& runtime, const ModelConfig& config, const RuntimeOptions& options,
              const DeviceWeights& weights, EngineOptions engine_options, const serving::ReqToTokenPool& slots,
              const serving::TokenAllocator& full, const serving::SwaTokenAllocator& swa);
  ~ModelRunner();
  ModelRunner(const ModelRunner&) = delete;
  ModelRunner& operator=(const ModelRunner&) = delete;

  // The stage this runner computes: layers [layer_begin, layer_end) of the model.
  ModelRunner(rt::Runtime& runtime, const ModelConfig& config, const RuntimeOptions& options,
              const DeviceWeights& weights, EngineOptions engine_options, const serving::ReqToTokenPool& slots,
              const serving::TokenAllocator& full, const serving::SwaTokenAllocator& swa, int64_t layer_begin,
              int64_t layer_end);

  // With MTP on: per real row, the token after the row's last one when it is already known (the
  // next prompt token of a chunk inside the prompt), -1 when the row samples it. Set before begin().
  void set_row_next_ids(std::vector<int32_t> next) { row_next_ids_ = std::move(next); }

  // Runs one batch to completion and returns what it computed. IDLE batches run nothing. A single
  // stage that holds every layer.
  StepRecord forward(const serving::ForwardBatch& batch);

  // The pieces of forward() that a pipeline driver interleaves with the stages' send/recv:
  // begin() writes the batch's metadata (probes go to `record`), launch() issues the stage's work
  // (or replays its graph) on the main stream without waiting, sample() (last stage, after the main
  // stream is synchronized) reads the logits, end() lets go of the record.
  void begin(const serving::ForwardBatch& batch, StepRecord* record);
  void launch(const serving::ForwardBatch& batch);
  std::vector<StepRow> sample(const serving::ForwardBatch& batch);
  // After the stage's streams are synchronized: the probes' values into the record.
  void finish_probes();
  void end();
  // The residual a stage receives (first rows of the input buffer) and the one it hands on.
  DeviceTensor stage_input(int64_t tokens) const;
  DeviceTensor stage_output(int64_t tokens) const;
  // Prefill CP: this runner is rank `rank` of `size` ranks meeting in communicator `comm`. During a
  // CP batch (begin_cp) every per-token op runs on the rank's share of the tokens (global token t
  // lives on rank t % size, row t / size, padded to equal shares), the kv (bf16, normed and rotated
  // in place on a contiguous copy of the qkv_a slice) and the compressors' projections are
  // all-gathered and put back in global order so that every rank writes the whole SWA cache, every
  // compressed entry and every state row, and the final residual is gathered for the head. All on
  // the main stream (sglang disables the overlap for prefill CP).
  void set_context_parallel(int comm, int rank, int size);
  void begin_cp(const serving::ForwardBatch& batch, StepRecord* record);
  int cp_rank() const { return cp_rank_; }
  bool is_first_stage() const { return layer_begin_ == 0; }
  bool is_last_stage() const { return layer_end_ == config_.n_layers; }

  // Speculative decoding, every stage, after the verify batch is sampled (`kept`: per real row, in
  // batch order, how many of its tokens the commit keeps: the accepted ones, fewer when the request
  // finishes on one): the compressed entries and compress-state rows that the other tokens wrote
  // get back the bytes they had before the batch (saved by the batch itself), so a rejected draft
  // never leaves anything in committed compressed state.
  void scrub_rejected(const serving::ForwardBatch& batch, const std::vector<int64_t>& kept);
  // Whether the batch needs the draft forward (last stage, speculative decoding): a verify batch in
  // DRAFT_EXTEND (v1) mode, or any batch with sampling rows when more than one token is drafted.
  bool needs_draft_forward(const serving::ForwardBatch& batch) const;
  // The draft forward, after sample() (its `samples` flags set): DRAFT_EXTEND (v1, verify batches)
  // runs the MTP block over each row's accepted tokens with the verify batch's final residuals and
  // the target's tokens, on its own metadata; then draft tokens 2..k come from the EAGLE chain: step
  // j runs the MTP block at the row's last kept position + j on the previous step's output residual
  // and draft (greedy, on the device), attending over the row's window and the chain's own earlier
  // steps (scratch slots of the MTP cache that no request owns). Verify batches in graph mode run it
  // as the draft graph of their bucket. Fills each sampling row's draft_ids (and, v1, draft_id and
  // draft_logits; chain_logits); DRAFT_EXTEND's probes go into `record` at the verify batch's tokens.
  void draft(const serving::ForwardBatch& batch, StepRecord& record);
  // Tests: the bytes of one layer's compressed cache and compress state (and on ratio-4 layers the
  // indexer's keys and state), after the main stream is synchronized.
  struct CompressedBytes {
    std::vector<uint8_t> cache, state, indexer_keys, indexer_state;
  };
  CompressedBytes compressed_bytes(int64_t layer);

  int64_t graphs_captured() const { return static_cast<int64_t>(graphs_.size() + draft_graphs_.size()); }
  int64_t graph_replays() const { return graph_replays_; }
  int64_t metadata_upgrades() const { return metadata_upgrades_; }
  const EngineOptions& options() const { return engine_options_; }
  rt::StreamId main_stream() const { return main_; }

 private:
  struct Layer;
  struct Streams;

  DeviceTensor alloc(const std::string& name, DType dtype, const Shape& shape);
  DeviceTensor alloc_state(const std::string& name, const serving::CompressStatePool& pool);
  std::unique_ptr<Layer> make_layer(int64_t id, const std::string& prefix, int64_t extra_swa_pages = 0);
  DeviceTensor view(const DeviceTensor& base, const Shape& shape) const;     // leading part, contiguous
  DeviceTensor rows(const DeviceTensor& base, int64_t count) const;          // first `count` rows
  DeviceTensor rows(const DeviceTensor& base, int64_t first, int64_t count) const;  // rows [first, first + count)
  rt::ByteRange range_of(const DeviceTensor& d) const;
  void op(rt::StreamId stream, const std::string& name, std::vector<DeviceTensor> reads,
          std::vector<DeviceTensor> writes, std::function<void()> fn, std::function<void()> check = {});
  void probe(rt::StreamId stream, const std::string& key, const DeviceTensor& value, int64_t cols);
  // A probe of several tensors turned into one value by `convert` (host views of the copies).
  void probe_with(rt::StreamId stream, const std::string& key, std::vector<DeviceTensor> values,
                  std::function<ref::Mat(const std::vector<Tensor>&)> convert);

  // Host side of a step: upgrade the metadata and write it to the device buffers.
  void prepare_metadata(const serving::ForwardBatch& batch, serving::ForwardMetadata& metadata);
  // The MTP block's own metadata (DRAFT_EXTEND's planning; V2 runs it over the batch's positions).
  void plan_draft_extend(bool verify, const std::vector<int32_t>& pos, const std::vector<int64_t>& swa_loc,
                         const std::vector<int32_t>& swa_idx, const std::vector<int32_t>& swa_len);
  // Writes the staged upgraded metadata on `stream` if no stream has yet (fault lazy-upgrade-on-alt-stream).
  void upgrade_on_first_use(rt::StreamId stream);
  // The whole forward of `tokens` tokens in `rows` rows as launches (run now, or captured).
  void issue_forward(int64_t tokens, int64_t rows);
  void issue_block(Layer& layer, int64_t T, const DeviceTensor& R, const DeviceTensor& R_out);
  void issue_head(const DeviceTensor& R, const DeviceTensor& last, const std::string& prefix, const std::string& norm,
                  const DeviceTensor& logits);
  void issue_mtp(const DeviceTensor& R_final, int64_t T, int64_t nrows);
  // The MTP block on `hidden` [T, hc * dim] and the next ids, with mtp_meta_ as its metadata: its
  // output residual into Rout and the draft logits of the `last` rows into `logits`.
  void issue_mtp_block(const DeviceTensor& hidden, int64_t T, const DeviceTensor& next, const DeviceTensor& last,
                       const DeviceTensor& logits, const DeviceTensor& Rout);
  // The draft forward's launches: DRAFT_EXTEND over `extend_tokens` tokens (v1; 0: none), then the
  // chain, for `nrows` rows of a batch of `batch_tokens` tokens.
  void issue_draft(int64_t nrows, int64_t extend_tokens, bool extend, int64_t batch_tokens);
  // Captures what `issue` launches into a graph on the main stream, its probes staged in the
  // buffers of `scope` (staging_scope_: 1 + a batch graph's key, or -(1 + rows) for a draft graph).
  rt::GraphId capture(int64_t scope, const std::function<void()>& issue);
  DeviceTensor final_residual(int64_t tokens) const;
  bool in_batch_mtp() const;  // the MTP block runs inside the current batch
  DeviceTensor weight(const std::string& name) const;
  void issue_attention(Layer& layer, int64_t T);
  void issue_compressor(rt::StreamId stream, Layer& layer, bool indexer, int64_t T);
  void issue_indexer(Layer& layer, int64_t T, rt::EventId q_lora_ready);
  void issue_moe(Layer& layer, int64_t T);
  void issue_linear(rt::StreamId stream, const std::string& weight, const DeviceTensor& x, const DeviceTensor& out);
  void wait_on(rt::StreamId waiter, rt::StreamId producer, const std::string& event_name);
  bool multi_stream_now() const { return engine_options_.multi_stream && !cp_active_; }
  // Local rows of every rank -> all-gathered -> global token order in `global` (contiguous [T, W]).
  void cp_gather(const DeviceTensor& local, const DeviceTensor& global);

  rt::Runtime& rt_;
  const ModelConfig& config_;
  RuntimeOptions options_;
  const DeviceWeights& weights_;
  EngineOptions engine_options_;
  const serving::ReqToTokenPool& slots_;
  const serving::TokenAllocator& full_;
  const serving::SwaTokenAllocator& swa_;

  int64_t layer_begin_ = 0, layer_end_ = 0;
  int cp_comm_ = -1, cp_rank_ = 0, cp_size_ = 1;
  bool cp_active_ = false;
  int64_t cp_global_tokens_ = 0;  // T of the batch during a CP batch
  DeviceTensor cp_gather_buf_, cp_kv_local_, cp_kv_global_, cp_c_local_kv_, cp_c_local_score_, cp_R_global_;
  std::unique_ptr<Streams> streams_saved_;
  bool graph_batch_ = false;
  serving::ForwardMetadata* batch_metadata_ = nullptr;
  int64_t max_tokens_ = 0;  // per batch: the chunk budget or the largest bucket
  int64_t max_head_rows_ = 0;  // rows through the head: rows, or every token of a verify batch
  int64_t max_rows_ = 0;
  int64_t c128_ratio_ = 0;
  bool has_c4_ = false;
  std::unique_ptr<serving::CompressStatePool> c4_pool_, c128_pool_;  // geometry per ratio
  std::vector<std::unique_ptr<Layer>> layers_;
  std::vector<rt::BufferId> owned_;

  rt::StreamId main_;
  std::unique_ptr<Streams> streams_;
  std::map<std::string, rt::EventId> events_;

  // Activations (max_tokens_ rows each; launches view the first T).
  DeviceTensor R_a_, R_b_, R_mid_, x_, xn_, post_, comb_, qkv_a_, qr_, q_, o_, u_, attn_out_;
  DeviceTensor ckv_, cscore_, centries_, ikv_, iscore_, ientries_;
  DeviceTensor iq_, iq32_, iw_bf16_, iw_, ilogits_, itopk_;
  DeviceTensor gate_logits_, experts_, expert_weights_, routed_, sg_, su_, sh_, shared_out_, ffn_out_;
  DeviceTensor last_R_, head_y_, head_yn_, logits_;
  std::unique_ptr<Layer> mtp_layer_;
  DeviceTensor m_row_next_, m_sampled_, m_next_ids_, mtp_e_, mtp_en_, mtp_ep_, mtp_hn_, mtp_hp_, mtp_R_, mtp_R_out_;
  DeviceTensor draft_logits_;
  // Metadata (persistent; written on the host before each step).
  DeviceTensor m_ids_, m_pos_, m_swa_loc_, m_swa_idx_, m_swa_len_, m_last_;
  DeviceTensor m_c4_plan_, m_c128_plan_, m_c4_ctx_, m_c4_block_table_, m_c4_schedule_, m_c4_idx_, m_c4_len_;
  DeviceTensor m_c128_idx_, m_c128_len_;
  DeviceTensor m_mtp_pos_, m_mtp_swa_loc_, m_mtp_swa_idx_, m_mtp_swa_len_;
  // The MTP block's metadata for the launches being issued: the batch's (plan_draft_extend), or
  // DRAFT_EXTEND's and each chain step's (draft()); `ids` are its next ids (hash routing reads them).
  struct MtpMeta {
    DeviceTensor pos, swa_loc, swa_idx, swa_len, ids;
  };
  MtpMeta mtp_meta_;
  // The draft forward: its metadata (DRAFT_EXTEND's tokens, then each chain step's rows), the
  // gather rows of its hidden inputs, DRAFT_EXTEND's next ids and last tokens, the first draft's
  // head row, 0..rows-1; the chain's inputs and every draft's logits ([k][rows], vocab).
  DeviceTensor m_dx_pos_, m_dx_swa_loc_, m_dx_swa_idx_, m_dx_swa_len_, m_dx_src_, m_dx_next_, m_dx_last_,
      m_dx_head_, m_dx_ident_;
  DeviceTensor mtp_hidden_, chain_ids_, chain_logits_;
  int64_t chain_scratch_base_ = 0;  // the first MTP-cache SWA location past the allocator's pages
  std::map<int64_t, rt::GraphId> draft_graphs_;  // per bucket (verify batches in graph mode)
  StepRecord draft_record_;  // DRAFT_EXTEND's probes, in its own token order
  bool suppress_probes_ = false;  // the chain steps record nothing
  serving::ForwardMode batch_mode_ = serving::ForwardMode::idle;
  // The scrub (speculative verify batches): per ratio, the entries and state rows that drafts may
  // overwrite, as int64 words [E, dest[E], S, row[S]] (backed up by the batch), with the (row, token
  // in row) that writes each; and the words of what to put back ([E, (slot, dest)[E], S, (slot, row)[S]]).
  struct ScrubCandidates {
    std::vector<std::pair<int64_t, int64_t>> entries, rows;  // (batch row, token index in the row)
    std::vector<int64_t> entry_dest, state_row;
  };
  ScrubCandidates c4_scrub_, c128_scrub_;
  DeviceTensor m_c4_backup_, m_c128_backup_, m_c4_scrub_, m_c128_scrub_;
  int64_t scrub_capacity_ = 0;  // entries (and rows) a verify batch may back up per ratio
  // Fault lazy-upgrade-on-alt-stream: the upgraded metadata waiting for its first consumer.
  struct StagedUpload {
    DeviceTensor target;
    std::vector<uint8_t> bytes;
  };
  std::vector<StagedUpload> staged_;
  bool upgrade_pending_ = false;
  bool replay_ = false;  // this batch replays a captured graph
  int64_t refresh_errors_swallowed_ = 0;  // fault frozen-metadata-not-refreshed
  int64_t swa_width_ = 0, c128_width_ = 0, c4_pages_ = 0, max_context_ = 0, plan_capacity_ = 0;
  Tensor freqs_dense_, freqs_compressed_;  // rope tables (host)

  std::unique_ptr<serving::ForwardMetadata> eager_metadata_;
  std::map<int64_t, std::unique_ptr<serving::ForwardMetadata>> bucket_metadata_;
  std::map<int64_t, rt::GraphId> graphs_;
  int64_t graph_replays_ = 0;
  int64_t metadata_upgrades_ = 0;
  StepRecord* record_ = nullptr;  // the step being run (probes write into it)
  struct ProbeSource {
    rt::BufferId staging;
    uint64_t bytes = 0;
    DType dtype = DType::u8;
    Shape shape, strides;
    int64_t offset = 0;  // elements from the staging buffer's start
  };
  struct PendingProbe {
    std::string key;
    std::vector<ProbeSource> sources;
    std::function<ref::Mat(const std::vector<Tensor>&)> convert;
  };
  std::vector<PendingProbe> pending_probes_;           // this step's, in issue order
  std::map<int64_t, std::vector<PendingProbe>> graph_probes_;  // per graph: the probes its capture issued
  std::map<int64_t, std::vector<PendingProbe>> draft_graph_probes_;  // likewise per draft graph
  std::map<std::string, rt::BufferId> probe_staging_;
  int64_t staging_scope_ = 0;  // 0 eager, 1 + the key of a graph being captured, -(1 + rows) a draft graph
  std::vector<int32_t> row_next_ids_;
};

}  // namespace dsv4::engine
