// Host launcher for one kernel source, built as a shared library and driven from Python
// (tests/kernels/host_emulation/__init__.py) with ctypes.
//
//   g++ -std=c++17 -shared -fPIC -include shim.h
//       -DEMU_KERNEL_SOURCE='"/path/preprocess.cu"'
//       -DEMU_ENTRY_POINTS='EMU_ENTRY(preprocess_u8_to_f32) EMU_ENTRY(...)' harness.cpp
//
// The kernel source is included as it is, so the launchers below take each entry point's
// parameter types from its own declaration: nothing here restates a signature, and an
// argument list packed for a different signature is reported, not run.
//
// A launch runs every (blockIdx, threadIdx) of the grid, exactly the threads a CUDA
// launch has, so the kernels' own bounds checks decide what gets written. Blocks run one
// after another (the kernels have no __syncthreads or shared memory, and the shim does
// not provide them). Within a block, threads are grouped into warps the way CUDA does
// (32 consecutive linear thread ids), and each lane of a warp runs as a fiber
// (ucontext) on the calling host thread: a lane runs until it returns or reaches a warp
// shuffle, and once every live lane of the warp is parked at the shuffle the values are
// exchanged and the lanes resume. So shuffles see exactly their partners' values, with no
// host threads, locks or scheduling noise, and a run is deterministic. A shuffle that
// some live lanes never reach (they returned first) is undefined on the device; here it
// is reported as an error.

#include <ucontext.h>

#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <utility>

#include EMU_KERNEL_SOURCE

namespace emu_harness {

constexpr int kLanes = 32;
// Per-lane stack. The kernels keep a few small arrays per thread (tens of floats).
constexpr std::size_t kLaneStack = 256 * 1024;

enum class LaneState { Runnable, AtShuffle, Done };

struct Lane {
    ucontext_t context;
    LaneState state = LaneState::Done;
    uint3 thread{};
    std::uint64_t value = 0, result = 0;
    int source = 0;
    unsigned size = 0, mask = 0;
};

// One launch's warp scheduler, run on the host thread that called emu_launch.
struct Warps {
    ucontext_t scheduler;
    Lane lanes[kLanes];
    std::unique_ptr<char[]> stacks{new char[kLanes * kLaneStack]};
    std::function<void()> body;  // one emulated thread: the kernel with the launch's arguments
    unsigned live = 0;           // lanes that are real threads of the block (the last warp may be partial)
    int current = -1;            // the lane running now
    bool broken = false;         // a shuffle some live lanes skipped: later shuffles return at once
    std::string error;           // the launch's first error

    void fail(const std::string& what) {
        if (error.empty()) error = what;
    }

    // Runs one warp of block `block` (its lanes' threadIdx in lanes[].thread) to the end.
    void run_warp(uint3 block);
    // After a round in which every live lane parked or finished: exchange, or report.
    void settle_shuffle();
};

thread_local Warps* active = nullptr;

void lane_entry() {
    Warps* w = active;
    w->body();
    w->lanes[w->current].state = LaneState::Done;
    // Returning resumes the scheduler (uc_link).
}

void Warps::run_warp(uint3 block) {
    broken = false;
    for (int l = 0; l < kLanes; ++l) {
        Lane& lane = lanes[l];
        if (!(live >> l & 1u)) {
            lane.state = LaneState::Done;
            continue;
        }
        getcontext(&lane.context);
        lane.context.uc_stack.ss_sp = stacks.get() + l * kLaneStack;
        lane.context.uc_stack.ss_size = kLaneStack;
        lane.context.uc_link = &scheduler;
        makecontext(&lane.context, lane_entry, 0);
        lane.state = LaneState::Runnable;
    }
    for (;;) {
        for (int l = 0; l < kLanes; ++l) {
            if (lanes[l].state != LaneState::Runnable) continue;
            current = l;
            blockIdx = block;
            threadIdx = lanes[l].thread;  // the built-ins are the resumed lane's own
            swapcontext(&scheduler, &lanes[l].context);
        }
        current = -1;
        int parked = 0;
        for (const Lane& lane : lanes) parked += lane.state == LaneState::AtShuffle;
        if (parked == 0) return;  // every live lane returned
        settle_shuffle();
    }
}

void Warps::settle_shuffle() {
    bool some_done = false;
    unsigned first_size = 0;
    for (int l = 0; l < kLanes; ++l) {
        if (!(live >> l & 1u)) continue;
        if (lanes[l].state == LaneState::Done) some_done = true;
        else if (first_size == 0) first_size = lanes[l].size;
    }
    if (some_done) {
        fail("__shfl_xor_sync reached by only some live lanes of a warp (the others returned)");
        broken = true;
    }
    for (int l = 0; l < kLanes; ++l) {
        Lane& lane = lanes[l];
        if (lane.state != LaneState::AtShuffle) continue;
        lane.state = LaneState::Runnable;
        lane.result = lane.value;
        if (some_done) continue;
        if (lane.size != first_size) fail("lanes of a warp shuffled values of different sizes");
        if (lane.mask != live) {
            char buf[120];
            std::snprintf(buf, sizeof buf, "shuffle mask 0x%08x is not the warp's live lanes 0x%08x", lane.mask, live);
            fail(buf);
        }
        const int s = lane.source;
        if (s < 0 || s >= kLanes || !(live >> s & 1u)) fail("a lane shuffled from a lane that is not a live thread");
        else lane.result = lanes[s].value;
    }
}

struct Config {
    unsigned grid[3];
    unsigned block[3];
};

// Does an argument packed as (numpy kind, byte size) match parameter type T? This is
// how pycuda packs: by the NumPy type, pointers as numpy.uintp.
template <typename T>
bool matches(char kind, int size) {
    if (size != (int)sizeof(T)) return false;
    if constexpr (std::is_pointer_v<T>) return kind == 'u';
    else if constexpr (std::is_floating_point_v<T>) return kind == 'f';
    else if constexpr (std::is_integral_v<T> && std::is_signed_v<T>) return kind == 'i';
    else if constexpr (std::is_integral_v<T>) return kind == 'u';
    else return false;
}

template <typename... A, std::size_t... I>
bool check_args(const char* kinds, const int* sizes, std::string& err, std::index_sequence<I...>) {
    bool ok = true;
    ((matches<A>(kinds[I], sizes[I])
          ? void()
          : (void)(ok = false, err += "argument " + std::to_string(I) + " packed as " + kinds[I] +
                                      std::to_string(sizes[I]) + " does not match the parameter (" +
                                      std::to_string(sizeof(A)) + " bytes); ")),
     ...);
    return ok;
}

template <typename... A, std::size_t... I>
void call(void (*kernel)(A...), void* const* args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}

template <typename... A>
int launch(void (*kernel)(A...), const Config& cfg, int nargs, void* const* args, const char* kinds,
           const int* sizes, std::string& err) {
    if (nargs != (int)sizeof...(A)) {
        err = "the kernel takes " + std::to_string(sizeof...(A)) + " arguments, got " + std::to_string(nargs);
        return 1;
    }
    if (!check_args<A...>(kinds, sizes, err, std::index_sequence_for<A...>{})) return 1;
    for (unsigned d : cfg.grid)
        if (d == 0) {
            err = "empty grid";
            return 1;
        }
    const unsigned threads = cfg.block[0] * cfg.block[1] * cfg.block[2];
    if (threads == 0) {
        err = "empty block";
        return 1;
    }
    const unsigned warps_per_block = (threads + kLanes - 1) / kLanes;
    const unsigned long long blocks = 1ull * cfg.grid[0] * cfg.grid[1] * cfg.grid[2];
    const unsigned long long warps_total = blocks * warps_per_block;
    Warps warps;
    warps.body = [&] { call(kernel, args, std::index_sequence_for<A...>{}); };
    active = &warps;
    gridDim = dim3(cfg.grid[0], cfg.grid[1], cfg.grid[2]);
    blockDim = dim3(cfg.block[0], cfg.block[1], cfg.block[2]);
    for (unsigned long long w = 0; w < warps_total; ++w) {
        const unsigned long long b = w / warps_per_block;
        const unsigned first = (unsigned)(w % warps_per_block) * kLanes;
        const unsigned n = std::min<unsigned>(kLanes, threads - first);
        warps.live = n == kLanes ? ~0u : (1u << n) - 1u;
        for (unsigned l = 0; l < n; ++l) {
            const unsigned t = first + l;
            warps.lanes[l].thread = make_uint3(t % cfg.block[0], t / cfg.block[0] % cfg.block[1],
                                               t / cfg.block[0] / cfg.block[1]);
        }
        warps.run_warp(make_uint3((unsigned)(b % cfg.grid[0]), (unsigned)(b / cfg.grid[0] % cfg.grid[1]),
                                  (unsigned)(b / cfg.grid[0] / cfg.grid[1])));
    }
    active = nullptr;
    if (!warps.error.empty()) {
        err = warps.error;
        return 2;
    }
    return 0;
}

using Launcher = int (*)(const Config&, int, void* const*, const char*, const int*, std::string&);

struct Entry {
    const char* name;
    Launcher launcher;
};

#define EMU_ENTRY(kernel)                                                                            \
    Entry{#kernel, [](const Config& c, int n, void* const* a, const char* k, const int* s, std::string& e) { \
              return launch(&kernel, c, n, a, k, s, e);                                               \
          }},

const Entry entries[] = {EMU_ENTRY_POINTS};

}  // namespace emu_harness

// A lane parks at a shuffle: it leaves its value with the scheduler and yields until
// the whole warp is there (or, in a warp already found diverged, returns its own value).
std::uint64_t emu::warp_exchange(unsigned mask, std::uint64_t bits, unsigned size, int src_lane) {
    emu_harness::Warps* w = emu_harness::active;
    if (w->broken) return bits;
    emu_harness::Lane& lane = w->lanes[w->current];
    if (w->current != emu::lane_id()) w->fail("lane id from the built-ins disagrees with the scheduler");
    lane.value = bits;
    lane.size = size;
    lane.mask = mask;
    lane.source = src_lane;
    lane.state = emu_harness::LaneState::AtShuffle;
    swapcontext(&lane.context, &w->scheduler);
    return lane.result;
}

extern "C" {

int emu_entry_count() { return (int)(sizeof emu_harness::entries / sizeof emu_harness::entries[0]); }

const char* emu_entry_name(int i) { return emu_harness::entries[i].name; }

// Runs entry point `name` over grid x block with args[i] pointing at argument i's bytes,
// packed as kinds[i] (numpy dtype kind) of sizes[i] bytes. 0: done; otherwise err says why.
int emu_launch(const char* name, const unsigned* grid, const unsigned* block, int nargs, void* const* args,
               const char* kinds, const int* sizes, char* err, int err_len) {
    std::string message = std::string("no entry point named ") + name;
    int rc = 1;
    for (const auto& e : emu_harness::entries)
        if (std::string(e.name) == name) {
            message.clear();
            rc = e.launcher(emu_harness::Config{{grid[0], grid[1], grid[2]}, {block[0], block[1], block[2]}},
                            nargs, args, kinds, sizes, message);
            break;
        }
    std::snprintf(err, (std::size_t)err_len, "%s", message.c_str());
    return rc;
}

// The shim's pieces on their own, so the tests can check them against NumPy.
void emu_float2half_rn(int n, const float* in, std::uint16_t* out) {
    for (int i = 0; i < n; ++i) {
        const __half_raw raw = __float2half_rn(in[i]);
        out[i] = raw.x;
    }
}

void emu_half2float(int n, const std::uint16_t* in, float* out) {
    for (int i = 0; i < n; ++i) {
        __half_raw raw;
        raw.x = in[i];
        out[i] = __half2float(__half(raw));
    }
}

void emu_sinpif(int n, const float* in, float* out) {
    for (int i = 0; i < n; ++i) out[i] = sinpif(in[i]);
}

}  // extern "C"
