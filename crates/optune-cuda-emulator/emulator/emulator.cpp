// The emulator's scheduler: one launch at a time in the process (a kernel's `__shared__` arrays
// are function-level statics, see emulator.h), its blocks one after another, a block's threads as
// ucontext fibers on the launching OS thread. The scheduler resumes every runnable fiber in turn;
// a fiber runs until it ends or waits at a barrier (__syncthreads, or either half of a warp
// shuffle). When none can run, a warp whose live lanes all wait at a shuffle goes on first, else
// the block when all its live threads wait at __syncthreads; otherwise the launch stops with a
// description of where its threads wait, which on a GPU would be a hang or undefined behaviour.

#include "emulator.h"

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdio>

#include <algorithm>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace emu {
namespace {

enum class State { Runnable, AtBlockBarrier, AtWarpBarrier, Done, Failed };

struct Fiber {
    ucontext_t context;
    std::unique_ptr<char[]> stack;
    dim3 index;
    State state;
};

struct Launch {
    const char *kernel;
    dim3 grid, block, block_index;
    void (*body)(void *);
    void *context;
    std::vector<Fiber> fibers;
    std::vector<float> exchange;  // one shuffled value per thread
    bool reversed = false;        // resume the block's threads last first
    ucontext_t scheduler;
    size_t current = 0;
    std::string error;
};

// Enough for the kernels' locals and libm's frames.
constexpr size_t STACK_BYTES = 128 * 1024;
constexpr unsigned WARP = 32;

std::mutex one_launch_at_a_time;
std::once_flag fault_handler_installed;
struct sigaction previous_fault_handler;
thread_local Launch *active = nullptr;
thread_local std::string error_message;

Fiber &running() { return active->fibers[active->current]; }

void wait(State state) {
    Fiber &fiber = running();
    fiber.state = state;
    swapcontext(&fiber.context, &active->scheduler);
}

// Stops the launch from inside a fiber; the fiber is never resumed.
void fail(std::string reason) {
    active->error = std::move(reason);
    wait(State::Failed);
}

void fiber_entry() {
    active->body(active->context);
    running().state = State::Done;  // uc_link returns to the scheduler
}

std::string describe(const dim3 &d) {
    return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) +
           ")";
}

// Runs the block `launch.block_index`; false with launch.error set when it cannot finish.
bool run_block(Launch &launch) {
    const size_t threads = launch.fibers.size();
    for (size_t t = 0; t < threads; ++t) {
        Fiber &fiber = launch.fibers[t];
        getcontext(&fiber.context);
        fiber.context.uc_stack.ss_sp = fiber.stack.get();
        fiber.context.uc_stack.ss_size = STACK_BYTES;
        fiber.context.uc_link = &launch.scheduler;
        makecontext(&fiber.context, fiber_entry, 0);
        fiber.state = State::Runnable;
    }
    for (;;) {
        for (size_t i = 0; i < threads; ++i) {
            const size_t t = launch.reversed ? threads - 1 - i : i;
            if (launch.fibers[t].state != State::Runnable) continue;
            launch.current = t;
            swapcontext(&launch.scheduler, &launch.fibers[t].context);
            if (launch.fibers[t].state == State::Failed) return false;
        }
        size_t done = 0, at_block = 0, at_warp = 0;
        for (const Fiber &fiber : launch.fibers) {
            done += fiber.state == State::Done;
            at_block += fiber.state == State::AtBlockBarrier;
            at_warp += fiber.state == State::AtWarpBarrier;
        }
        if (done == threads) return true;
        bool released = false;
        for (size_t base = 0; base < threads; base += WARP) {
            const size_t end = std::min(base + WARP, threads);
            size_t waiting = 0, exited = 0;
            for (size_t t = base; t < end; ++t) {
                waiting += launch.fibers[t].state == State::AtWarpBarrier;
                exited += launch.fibers[t].state == State::Done;
            }
            if (waiting == 0 || waiting + exited < end - base) continue;
            if (exited > 0) {
                launch.error = "a warp shuffle in warp " + std::to_string(base / WARP) +
                               " after " + std::to_string(exited) + " of its lanes exited";
                return false;
            }
            for (size_t t = base; t < end; ++t) launch.fibers[t].state = State::Runnable;
            released = true;
        }
        if (released) continue;
        if (at_block > 0 && at_block + done == threads) {
            for (Fiber &fiber : launch.fibers) {
                if (fiber.state == State::AtBlockBarrier) fiber.state = State::Runnable;
            }
            continue;
        }
        launch.error = "threads that can never go on: " + std::to_string(at_block) +
                       " wait at __syncthreads, " + std::to_string(at_warp) +
                       " at a warp shuffle whose other lanes do not come, " +
                       std::to_string(done) + " have exited";
        return false;
    }
}

// A fault inside a launch is a kernel touching memory outside its buffers (each buffer of the
// tests sits against an inaccessible page, see optune_emu_guarded_alloc): reported with the kernel,
// block and thread, then the process ends, as a GPU's illegal address would end it. Any other
// fault goes to the handler that was there before (Rust's stack-overflow report).
void on_fault(int signal, siginfo_t *info, void *) {
    if (active == nullptr) {
        sigaction(signal, &previous_fault_handler, nullptr);
        return;  // the faulting instruction runs again, under the previous handler
    }
    const dim3 &b = active->block_index, &t = running().index;
    char message[512];
    const int n = std::snprintf(
        message, sizeof message,
        "emulated CUDA kernel %s, block (%u, %u, %u), thread (%u, %u, %u): access at %p "
        "outside its buffers (on a GPU: an illegal address)\n",
        active->kernel, b.x, b.y, b.z, t.x, t.y, t.z, info->si_addr);
    if (n > 0) (void)!write(STDERR_FILENO, message, size_t(n));
    _exit(134);
}

void install_fault_handler() {
    struct sigaction action = {};
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, &previous_fault_handler);
}

size_t page_bytes() { return size_t(sysconf(_SC_PAGESIZE)); }

// The pages a guarded buffer of `bytes` spans before its guard page.
size_t guarded_body(size_t bytes) {
    const size_t page = page_bytes();
    return bytes == 0 ? page : (bytes + page - 1) / page * page;
}

}  // namespace

const dim3 &thread_index() { return running().index; }
const dim3 &block_index() { return active->block_index; }
const dim3 &block_dim() { return active->block; }
const dim3 &grid_dim() { return active->grid; }

void sync_block() { wait(State::AtBlockBarrier); }

namespace {
// The value lane `source` of the calling warp holds, every lane of it taking part.
float exchange(unsigned mask, float value, int source) {
    if (mask != 0xffffffffu) fail("a warp shuffle with a partial mask (not emulated)");
    const size_t me = active->current;
    const size_t base = me - me % WARP;
    if (base + WARP > active->fibers.size()) fail("a warp shuffle in a partial warp");
    if (source < 0 || source >= int(WARP)) fail("a warp shuffle from a lane outside the warp");
    active->exchange[me] = value;
    wait(State::AtWarpBarrier);  // every lane has written
    const float theirs = active->exchange[base + unsigned(source)];
    wait(State::AtWarpBarrier);  // every lane has read
    return theirs;
}
}  // namespace

float shfl_xor(unsigned mask, float value, int lane_mask) {
    if (lane_mask < 0 || lane_mask >= int(WARP)) fail("a warp shuffle to a lane outside the warp");
    return exchange(mask, value, int((active->current % WARP) ^ unsigned(lane_mask)));
}

float shfl(unsigned mask, float value, int source) { return exchange(mask, value, source); }

int launch_erased(const char *kernel, dim3 grid, dim3 block, bool reversed, void (*body)(void *),
                  void *context) {
    const std::lock_guard<std::mutex> lock(one_launch_at_a_time);
    std::call_once(fault_handler_installed, install_fault_handler);
    const size_t blocks = size_t(grid.x) * grid.y * grid.z;
    const size_t threads = size_t(block.x) * block.y * block.z;
    if (blocks == 0 || threads == 0 || threads > 1024) {
        error_message = std::string(kernel) + ": grid " + describe(grid) + " of blocks " +
                        describe(block) +
                        ": CUDA refuses a launch over no blocks, of no threads or of more than "
                        "1024 threads a block";
        return -1;
    }
    Launch launch;
    launch.kernel = kernel;
    launch.grid = grid;
    launch.block = block;
    launch.body = body;
    launch.context = context;
    launch.reversed = reversed;
    launch.fibers.resize(threads);
    launch.exchange.assign(threads, 0.0f);
    for (size_t t = 0; t < threads; ++t) {
        Fiber &fiber = launch.fibers[t];
        fiber.stack.reset(new char[STACK_BYTES]);
        fiber.index = {unsigned(t % block.x), unsigned(t / block.x % block.y),
                       unsigned(t / (size_t(block.x) * block.y))};
    }
    Launch *outer = active;
    active = &launch;
    bool ok = true;
    for (size_t b = 0; b < blocks && ok; ++b) {
        const size_t i = reversed ? blocks - 1 - b : b;
        launch.block_index = {unsigned(i % grid.x), unsigned(i / grid.x % grid.y),
                              unsigned(i / (size_t(grid.x) * grid.y))};
        ok = run_block(launch);
    }
    active = outer;
    if (!ok) {
        error_message = std::string(kernel) + ", block " + describe(launch.block_index) + ": " +
                        launch.error;
        return -1;
    }
    return 0;
}

const char *last_error() { return error_message.c_str(); }

int refuse(const std::string &message) {
    error_message = message;
    return -1;
}

}  // namespace emu

extern "C" const char *optune_emu_last_error() { return emu::last_error(); }

// A buffer of `bytes` between two inaccessible pages: [guard][body][guard], the body the whole
// pages the bytes need. With `at_start` 0 the buffer ends where the trailing guard begins, so a
// kernel reading or writing past its end faults at once (on_fault); with 1 it starts where the
// leading guard ends, so an access before its start does. Null when the mapping fails.
extern "C" void *optune_emu_guarded_alloc(size_t bytes, int at_start) {
    const size_t body = emu::guarded_body(bytes), page = emu::page_bytes();
    void *mapped = mmap(nullptr, page + body + page, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mapped == MAP_FAILED) return nullptr;
    char *base = static_cast<char *>(mapped);
    if (mprotect(base, page, PROT_NONE) != 0 || mprotect(base + page + body, page, PROT_NONE) != 0) {
        munmap(mapped, page + body + page);
        return nullptr;
    }
    return at_start ? base + page : base + page + body - bytes;
}

extern "C" void optune_emu_guarded_free(void *data, size_t bytes, int at_start) {
    const size_t body = emu::guarded_body(bytes), page = emu::page_bytes();
    char *body_start = at_start ? static_cast<char *>(data) : static_cast<char *>(data) + bytes - body;
    munmap(body_start - page, page + body + page);
}
