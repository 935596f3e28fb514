// The execution model of emulate.h, and the table of every kernel in kernels/*.cu.
//
// The test harness generates `kernels.inc` from kernels/*.cu (an #include of each file and the
// list of their `extern "C" __global__` entry points), so no kernel is listed here by hand.
#include "emulate.h"

#include <sys/mman.h>

#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace emulation {
namespace {

// ---- fibers --------------------------------------------------------------------------------
// A fiber is a stack and a saved stack pointer; switching saves the callee-saved registers on
// the old stack and pops them from the new one, as a function call would.

constexpr std::size_t kStackBytes = 64 * 1024;
constexpr std::size_t kPage = 4096;
constexpr unsigned kMaxThreads = 1024;

extern "C" void emulation_switch(void** save, void* load);
extern "C" void emulation_fiber_start();

#if defined(__x86_64__)
asm(R"(
    .text
    .p2align 4
    .globl emulation_switch
    .hidden emulation_switch
    .type emulation_switch, @function
emulation_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    stmxcsr 8(%rsp)
    fnstcw (%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr 8(%rsp)
    fldcw (%rsp)
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emulation_switch, .-emulation_switch

    .p2align 4
    .globl emulation_fiber_start
    .hidden emulation_fiber_start
    .type emulation_fiber_start, @function
emulation_fiber_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size emulation_fiber_start, .-emulation_fiber_start
)");

// The first switch into a fiber "returns" into emulation_fiber_start, which calls entry(arg).
void* prepare_stack(unsigned char* stack_top, void (*entry)(void*), void* arg) {
    auto* frame = reinterpret_cast<std::uint64_t*>(stack_top - 88);
    std::uint32_t mxcsr;
    std::uint16_t fpu;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpu));
    std::memset(frame, 0, 88);
    std::memcpy(reinterpret_cast<unsigned char*>(frame), &fpu, sizeof fpu);
    std::memcpy(reinterpret_cast<unsigned char*>(frame) + 8, &mxcsr, sizeof mxcsr);
    frame[2] = 0;                                               // r15
    frame[3] = 0;                                               // r14
    frame[4] = reinterpret_cast<std::uint64_t>(entry);          // r13
    frame[5] = reinterpret_cast<std::uint64_t>(arg);            // r12
    frame[6] = 0;                                               // rbx
    frame[7] = 0;                                               // rbp
    frame[8] = reinterpret_cast<std::uint64_t>(&emulation_fiber_start);  // return address
    return frame;
}
#else
#error "the kernel emulation's fibers are written for x86-64"
#endif

struct Barrier {
    unsigned expected = 0;
    unsigned arrived = 0;
    unsigned generation = 0;

    void release() {
        arrived = 0;
        ++generation;
    }
};

struct Fiber {
    void* sp = nullptr;
    bool started = false;
    bool done = false;
    const Barrier* waiting = nullptr;
    unsigned waiting_generation = 0;
};

// What one OS thread needs to run blocks: a stack per CUDA thread, the fibers, the barriers of
// the block it runs and the warps' exchange slots.
struct Worker {
    unsigned char* stacks = nullptr;
    Fiber fibers[kMaxThreads];
    void* scheduler_sp = nullptr;
    unsigned current = 0;
    unsigned threads = 0;
    Barrier block;
    Barrier warps[kMaxThreads / 32];
    float exchange[kMaxThreads / 32][32];
    void (*body)(const void*) = nullptr;
    const void* context = nullptr;

    Worker() {
        const std::size_t bytes = kStackBytes * kMaxThreads;
        void* memory = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (memory == MAP_FAILED) {
            std::fprintf(stderr, "kernel emulation: cannot map fiber stacks\n");
            std::abort();
        }
        stacks = static_cast<unsigned char*>(memory);
        // A guard page at the bottom of every stack turns an overflow into a fault, not corruption.
        for (unsigned t = 0; t < kMaxThreads; ++t) mprotect(stacks + t * kStackBytes, kPage, PROT_NONE);
    }

    unsigned char* stack_top(unsigned thread) { return stacks + (thread + 1) * kStackBytes; }
};

thread_local Worker* worker = nullptr;

Worker& this_worker() {
    if (worker == nullptr) worker = new Worker();  // lives as long as its OS thread's pool
    return *worker;
}

void fiber_main(void* arg) {
    Worker& w = *static_cast<Worker*>(arg);
    w.body(w.context);
    // A thread that returns no longer takes part in the barriers, as on the hardware.
    const unsigned thread = w.current;
    Barrier& warp = w.warps[thread / 32];
    for (Barrier* b : {&w.block, &warp}) {
        --b->expected;
        if (b->arrived > 0 && b->arrived >= b->expected) b->release();
    }
    w.fibers[thread].done = true;
    emulation_switch(&w.fibers[thread].sp, w.scheduler_sp);
}

void arrive(Barrier& barrier) {
    Worker& w = *worker;
    if (++barrier.arrived >= barrier.expected) {
        barrier.release();
        return;
    }
    Fiber& me = w.fibers[w.current];
    me.waiting = &barrier;
    me.waiting_generation = barrier.generation;
    emulation_switch(&me.sp, w.scheduler_sp);
}

dim3 thread_coordinates(unsigned t) {
    return dim3{t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
}

// Runs one block: every fiber in turn until it finishes or waits at a barrier whose generation
// has not moved, round after round, until all have finished.
void run_block(Worker& w) {
    const unsigned threads = w.threads;
    w.block = Barrier{threads, 0, 0};
    for (unsigned warp = 0; warp * 32 < threads; ++warp) w.warps[warp] = Barrier{std::min(32u, threads - warp * 32), 0, 0};
    for (unsigned t = 0; t < threads; ++t) w.fibers[t] = Fiber{};
    unsigned remaining = threads;
    while (remaining > 0) {
        bool progressed = false;
        for (unsigned t = 0; t < threads; ++t) {
            Fiber& fiber = w.fibers[t];
            if (fiber.done) continue;
            if (fiber.waiting != nullptr && fiber.waiting->generation == fiber.waiting_generation) continue;
            fiber.waiting = nullptr;
            if (!fiber.started) {
                fiber.sp = prepare_stack(w.stack_top(t), &fiber_main, &w);
                fiber.started = true;
            }
            w.current = t;
            threadIdx = thread_coordinates(t);
            emulation_switch(&w.scheduler_sp, fiber.sp);
            progressed = true;
            if (fiber.done) --remaining;
        }
        if (!progressed) {
            std::fprintf(stderr,
                         "kernel emulation: block (%u, %u, %u) deadlocked: threads wait at barriers others never reach\n",
                         blockIdx.x, blockIdx.y, blockIdx.z);
            std::abort();
        }
    }
}

// ---- the pool of OS threads that run blocks ------------------------------------------------

struct Launch {
    Grid shape;
    void (*body)(const void*);
    const void* context;
    std::uint64_t blocks;
    std::atomic<std::uint64_t> next{0};
};

void run_blocks(Launch& launch) {
    Worker& w = this_worker();
    w.threads = launch.shape.block.x * launch.shape.block.y * launch.shape.block.z;
    w.body = launch.body;
    w.context = launch.context;
    const std::uint64_t gx = launch.shape.grid.x, gy = launch.shape.grid.y;
    for (std::uint64_t i; (i = launch.next.fetch_add(1)) < launch.blocks;) {
        blockIdx = dim3{static_cast<unsigned>(i % gx), static_cast<unsigned>((i / gx) % gy),
                        static_cast<unsigned>(i / (gx * gy))};
        run_block(w);
    }
}

class Pool {
public:
    Pool() {
        const unsigned cores = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
        for (unsigned i = 1; i < cores; ++i) threads_.emplace_back([this] { serve(); });
    }

    // Runs the launch on every thread of the pool and the caller's, and waits for all.
    void run(Launch& launch) {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            launch_ = &launch;
            busy_ = threads_.size();
            ++generation_;
        }
        wake_.notify_all();
        run_blocks(launch);
        std::unique_lock<std::mutex> lock(mutex_);
        idle_.wait(lock, [this] { return busy_ == 0; });
        launch_ = nullptr;
    }

private:
    void serve() {
        std::uint64_t seen = 0;
        for (;;) {
            Launch* launch;
            {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [&] { return generation_ != seen; });
                seen = generation_;
                launch = launch_;
            }
            run_blocks(*launch);
            std::lock_guard<std::mutex> lock(mutex_);
            if (--busy_ == 0) idle_.notify_one();
        }
    }

    std::vector<std::thread> threads_;
    std::mutex mutex_;
    std::condition_variable wake_, idle_;
    Launch* launch_ = nullptr;
    std::size_t busy_ = 0;
    std::uint64_t generation_ = 0;
};

}  // namespace

void sync_block() { arrive(worker->block); }

void sync_warp() { arrive(worker->warps[worker->current / 32]); }

float shuffle_xor(float value, int offset) {
    Worker& w = *worker;
    const unsigned warp = w.current / 32, lane = w.current % 32;
    w.exchange[warp][lane] = value;
    arrive(w.warps[warp]);
    const float other = w.exchange[warp][lane ^ static_cast<unsigned>(offset)];
    arrive(w.warps[warp]);
    return other;
}

void run_grid(const Grid& shape, void (*body)(const void*), const void* context) {
    // The pool's threads are never joined: they live as long as the process, like a GPU's SMs.
    static Pool* pool = new Pool();
    static std::mutex one_launch;
    std::lock_guard<std::mutex> guard(one_launch);
    gridDim = shape.grid;
    blockDim = shape.block;
    Launch launch{shape, body, context,
                  static_cast<std::uint64_t>(shape.grid.x) * shape.grid.y * shape.grid.z};
    pool->run(launch);
}

}  // namespace emulation

#include "kernels.inc"

namespace emulation {

const Kernel* find_kernel(const char* name) {
#define HEADROOM_KERNEL_ENTRY(entry)                                                                   \
    Kernel{#entry, static_cast<unsigned>(std::tuple_size_v<typename Trampoline<&entry>::Values>), \
           &Trampoline<&entry>::launch},
    static const Kernel table[] = {HEADROOM_KERNELS(HEADROOM_KERNEL_ENTRY)};
#undef HEADROOM_KERNEL_ENTRY
    for (const Kernel& kernel : table) {
        if (std::strcmp(kernel.name, name) == 0) return &kernel;
    }
    return nullptr;
}

}  // namespace emulation
