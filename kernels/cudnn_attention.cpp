// cuDNN's fused flash attention (SDPA) through cudnn-frontend's graph API, for the `cudnn`
// feature: a causal forward that keeps the softmax statistics (log-sum-exp per query and head)
// and its backward, with grouped-query heads. Two layouts:
//  - dense: `b` rows of `s` tokens; q, k, v and the input gradients `[b, heads, s, d]`, the
//    output and its gradient `[b, s, heads, d]`, the statistics `[b, heads, s]`;
//  - ragged: `b` segments of one row, each its own causal sequence (packed examples never see
//    each other), every tensor token-major `[tokens, heads, d]` (statistics `[tokens, heads]`),
//    with segment lengths and offsets in device memory; `s` bounds the longest.
// A graph is built once per shape and kept. libcudnn.so.9 is opened at run time
// (cudnn-frontend's dynamic loading), so the binary starts where cuDNN is absent and the caller
// falls back to its own attention.

#include <cudnn_frontend.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include <dlfcn.h>

namespace cudnn_frontend {
void *cudnn_dlhandle = nullptr;
}

namespace fe = cudnn_frontend;

namespace {

enum Uid : int64_t {
    Q = 1,
    K,
    V,
    O,
    STATS,
    DO,
    DQ,
    DK,
    DV,
    SCALE,
    SEQ_LEN,
    OFF_Q,
    OFF_KV,
    OFF_STATS,
};

std::mutex lock;
std::map<int, cudnnHandle_t> handles;
using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int, int, int, int>;
std::map<Key, std::shared_ptr<fe::graph::Graph>> graphs;

void fail(char *err, size_t n, const std::string &msg) {
    if (n == 0) return;
    std::strncpy(err, msg.c_str(), n - 1);
    err[n - 1] = 0;
}

}  // namespace

extern "C" {

// The shape of one attention call. `dtype` 0 is bf16, 1 is f16.
struct QlSdpa {
    int64_t b, hq, hkv, s, d;
    int32_t ragged, dtype, device;
    float scale;
};

// Device pointers of one call; those a direction does not use are null.
struct QlSdpaPtrs {
    void *q, *k, *v, *o, *stats, *dout, *dq, *dk, *dv;
    void *seq_len, *off_q, *off_kv, *off_stats;
};

}  // extern "C"

namespace {

#define TRY(expr)                                        \
    do {                                                 \
        auto status_ = (expr);                           \
        if (!status_.is_good()) {                        \
            fail(err, n, #expr ": " + status_.get_message()); \
            return nullptr;                              \
        }                                                \
    } while (0)

std::shared_ptr<fe::graph::Graph> build(const QlSdpa &p, bool backward, cudnnHandle_t h, char *err,
                                        size_t n) {
    using fe::graph::Tensor_attributes;
    auto g = std::make_shared<fe::graph::Graph>();
    g->set_io_data_type(p.dtype == 0 ? fe::DataType_t::BFLOAT16 : fe::DataType_t::HALF)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    const int64_t b = p.b, hq = p.hq, hkv = p.hkv, s = p.s, d = p.d;
    std::vector<int64_t> qs, kvs, os, ss;
    if (p.ragged) {
        // The batch stride is unused (each segment starts at its ragged offset), but cuDNN
        // checks that it keeps 16-byte alignment.
        qs = {s * hq * d, d, hq * d, 1};
        kvs = {s * hkv * d, d, hkv * d, 1};
        os = qs;
        ss = {hq * s, 1, hq, 1};
    } else {
        qs = {hq * s * d, s * d, d, 1};
        kvs = {hkv * s * d, s * d, d, 1};
        os = {s * hq * d, d, hq * d, 1};
        ss = {hq * s, s, 1, 1};
    }
    auto tensor = [&](int64_t uid, const char *name, std::vector<int64_t> dim,
                      std::vector<int64_t> stride) {
        return g->tensor(
            Tensor_attributes().set_uid(uid).set_name(name).set_dim(dim).set_stride(stride));
    };
    auto index = [&](int64_t uid, const char *name, int64_t len) {
        return g->tensor(Tensor_attributes()
                             .set_uid(uid)
                             .set_name(name)
                             .set_dim({len, 1, 1, 1})
                             .set_stride({1, 1, 1, 1})
                             .set_data_type(fe::DataType_t::INT32));
    };
    auto q = tensor(Q, "q", {b, hq, s, d}, qs);
    auto k = tensor(K, "k", {b, hkv, s, d}, kvs);
    auto v = tensor(V, "v", {b, hkv, s, d}, kvs);
    auto scale = g->tensor(Tensor_attributes()
                               .set_uid(SCALE)
                               .set_name("scale")
                               .set_dim({1, 1, 1, 1})
                               .set_stride({1, 1, 1, 1})
                               .set_is_pass_by_value(true)
                               .set_data_type(fe::DataType_t::FLOAT));
    std::shared_ptr<Tensor_attributes> seq, off_q, off_kv, off_stats;
    if (p.ragged) {
        seq = index(SEQ_LEN, "seq_len", b);
        off_q = index(OFF_Q, "off_q", b + 1);
        off_kv = index(OFF_KV, "off_kv", b + 1);
        off_stats = index(OFF_STATS, "off_stats", b + 1);
        q->set_ragged_offset(off_q);
        k->set_ragged_offset(off_kv);
        v->set_ragged_offset(off_kv);
    }
    if (!backward) {
        auto opts = fe::graph::SDPA_attributes()
                        .set_name("attention")
                        .set_generate_stats(true)
                        .set_causal_mask(true)
                        .set_attn_scale(scale);
        if (p.ragged) opts.set_padding_mask(true).set_seq_len_q(seq).set_seq_len_kv(seq);
        auto [o, stats] = g->sdpa(q, k, v, opts);
        o->set_output(true).set_uid(O).set_dim({b, hq, s, d}).set_stride(os);
        stats->set_output(true)
            .set_uid(STATS)
            .set_data_type(fe::DataType_t::FLOAT)
            .set_dim({b, hq, s, 1})
            .set_stride(ss);
        if (p.ragged) {
            o->set_ragged_offset(off_q);
            stats->set_ragged_offset(off_stats);
        }
    } else {
        auto o = tensor(O, "o", {b, hq, s, d}, os);
        auto dout = tensor(DO, "dout", {b, hq, s, d}, os);
        auto stats = g->tensor(Tensor_attributes()
                                   .set_uid(STATS)
                                   .set_name("stats")
                                   .set_dim({b, hq, s, 1})
                                   .set_stride(ss)
                                   .set_data_type(fe::DataType_t::FLOAT));
        if (p.ragged) {
            o->set_ragged_offset(off_q);
            dout->set_ragged_offset(off_q);
            stats->set_ragged_offset(off_stats);
        }
        auto opts = fe::graph::SDPA_backward_attributes()
                        .set_name("attention_backward")
                        .set_causal_mask(true)
                        .set_attn_scale(scale);
        if (p.ragged) opts.set_padding_mask(true).set_seq_len_q(seq).set_seq_len_kv(seq);
        auto [dq, dk, dv] = g->sdpa_backward(q, k, v, o, dout, stats, opts);
        dq->set_output(true).set_uid(DQ).set_dim({b, hq, s, d}).set_stride(qs);
        dk->set_output(true).set_uid(DK).set_dim({b, hkv, s, d}).set_stride(kvs);
        dv->set_output(true).set_uid(DV).set_dim({b, hkv, s, d}).set_stride(kvs);
        if (p.ragged) {
            dq->set_ragged_offset(off_q);
            dk->set_ragged_offset(off_kv);
            dv->set_ragged_offset(off_kv);
        }
    }
    TRY(g->validate());
    TRY(g->build_operation_graph(h));
    TRY(g->create_execution_plans({fe::HeurMode_t::A}));
    TRY(g->check_support(h));
    TRY(g->build_plans(h));
    return g;
}

// The device's handle and the graph of this shape, built on first use; null with `err` set when
// cuDNN cannot run it. Called with `lock` held.
std::shared_ptr<fe::graph::Graph> graph(const QlSdpa &p, bool backward, cudnnHandle_t *h,
                                        char *err, size_t n) {
    if (!fe::cudnn_dlhandle) {
        fail(err, n, "libcudnn is not open");
        return nullptr;
    }
    auto it = handles.find(p.device);
    if (it == handles.end()) {
        cudnnHandle_t fresh;
        if (fe::detail::create_handle(&fresh) != CUDNN_STATUS_SUCCESS) {
            fail(err, n, "cudnnCreate failed");
            return nullptr;
        }
        it = handles.emplace(p.device, fresh).first;
    }
    *h = it->second;
    Key key{p.b, p.hq, p.hkv, p.s, p.d, p.ragged, p.dtype, p.device, backward};
    auto found = graphs.find(key);
    if (found != graphs.end()) return found->second;
    auto g = build(p, backward, *h, err, n);
    if (g) graphs.emplace(key, g);
    return g;
}

}  // namespace

extern "C" {

// Open libcudnn (`path`, or libcudnn.so.9 on the library path): its version, or 0 with `err`.
int64_t qlorad_cudnn_open(const char *path, char *err, size_t n) {
    std::lock_guard<std::mutex> guard(lock);
    if (!fe::cudnn_dlhandle) {
        const char *lib = (path && *path) ? path : "libcudnn.so.9";
        fe::cudnn_dlhandle = dlopen(lib, RTLD_NOW | RTLD_GLOBAL);
        if (!fe::cudnn_dlhandle) {
            const char *why = dlerror();
            fail(err, n, std::string("dlopen ") + lib + ": " + (why ? why : "not found"));
            return 0;
        }
    }
    try {
        return static_cast<int64_t>(fe::detail::get_backend_version());
    } catch (const std::exception &e) {
        fail(err, n, e.what());
        return 0;
    }
}

// Build (or find) the graph of this call: its workspace bytes, or -1 with `err`.
int64_t qlorad_sdpa_plan(const QlSdpa *p, int32_t backward, char *err, size_t n) {
    std::lock_guard<std::mutex> guard(lock);
    try {
        cudnnHandle_t h;
        auto g = graph(*p, backward != 0, &h, err, n);
        if (!g) return -1;
        return g->get_workspace_size();
    } catch (const std::exception &e) {
        fail(err, n, e.what());
        return -1;
    }
}

// Queue one call on `stream`: 0, or -1 with `err`.
int32_t qlorad_sdpa_run(const QlSdpa *p, int32_t backward, void *stream, const QlSdpaPtrs *x,
                        void *workspace, char *err, size_t n) {
    std::lock_guard<std::mutex> guard(lock);
    try {
        cudnnHandle_t h;
        auto g = graph(*p, backward != 0, &h, err, n);
        if (!g) return -1;
        if (fe::detail::set_stream(h, static_cast<cudaStream_t>(stream)) != CUDNN_STATUS_SUCCESS) {
            fail(err, n, "cudnnSetStream failed");
            return -1;
        }
        float scale = p->scale;
        std::unordered_map<int64_t, void *> pack = {
            {Q, x->q}, {K, x->k}, {V, x->v}, {O, x->o}, {STATS, x->stats}, {SCALE, &scale}};
        if (backward) {
            pack[DO] = x->dout;
            pack[DQ] = x->dq;
            pack[DK] = x->dk;
            pack[DV] = x->dv;
        }
        if (p->ragged) {
            pack[SEQ_LEN] = x->seq_len;
            pack[OFF_Q] = x->off_q;
            pack[OFF_KV] = x->off_kv;
            pack[OFF_STATS] = x->off_stats;
        }
        auto status = g->execute(h, pack, workspace);
        if (!status.is_good()) {
            fail(err, n, "execute: " + status.get_message());
            return -1;
        }
        return 0;
    } catch (const std::exception &e) {
        fail(err, n, e.what());
        return -1;
    }
}

}  // extern "C"
