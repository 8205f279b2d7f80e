// The fiber scheduler behind cuda_emulation.h. One block runs at a time: its
// threads are fibers that run, in the chosen order, until they exit or reach
// __syncthreads(); when none can run, the barrier is checked and released.
// A fiber is started once with makecontext / swapcontext and then switched
// with _setjmp / _longjmp (no signal-mask system call per switch); it loops
// over the kernel, so one fiber serves its thread index in every block and
// launch. Single-threaded by design (GoogleTest runs tests one by one).
#include "cuda_emulation.h"

#include <setjmp.h>
#include <ucontext.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace torchopt_ext::cuda_emulation {
namespace {

// Kernel frames here are small (their by-value argument tables are at most
// 4 KB); the stacks are reused across launches and only touched pages cost.
constexpr size_t kStackBytes = 256 * 1024;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxGridYZ = 65535;

enum class FiberState { kRunnable, kAtBarrier, kExited };

struct Fiber {
  ucontext_t start_context;  // used once, to enter fiber_entry on the fiber's stack
  jmp_buf context;
  bool started = false;
  Coordinates coordinates;
  FiberState state = FiberState::kRunnable;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
};

struct Emulator {
  ucontext_t scheduler_start_context;
  jmp_buf scheduler;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  const std::function<void()>* kernel = nullptr;
  Fiber* running = nullptr;
  Order order = Order::kForward;
  Counters counters;
};

Emulator& emulator() {
  static Emulator instance;
  return instance;
}

// Saves the running fiber and returns to the scheduler.
void yield_to_scheduler(Emulator& e, Fiber& f) {
  if (_setjmp(f.context) == 0) {
    _longjmp(e.scheduler, 1);
  }
}

// A fiber's whole life: run the kernel as the thread it is told to be, report
// the exit, wait to be resumed for the next block.
void fiber_entry() {
  Emulator& e = emulator();
  while (true) {
    (*e.kernel)();
    Fiber& f = *e.running;
    f.state = FiberState::kExited;
    yield_to_scheduler(e, f);
  }
}

// Runs `f` until it yields (barrier or exit).
void resume(Emulator& e, Fiber& f) {
  e.running = &f;
  if (_setjmp(e.scheduler) == 0) {
    if (f.started) {
      _longjmp(f.context, 1);
    }
    f.started = true;
    swapcontext(&e.scheduler_start_context, &f.start_context);
  }
  e.running = nullptr;
}

std::string describe(dim3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

void check_configuration(dim3 grid, dim3 block) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) {
    throw std::invalid_argument("cuda_emulation: launch with an empty grid " + describe(grid) +
                                " (CUDA: invalid configuration argument)");
  }
  if (threads == 0 || threads > kMaxThreadsPerBlock || block.z > 64) {
    throw std::invalid_argument("cuda_emulation: invalid block " + describe(block));
  }
  if (grid.y > kMaxGridYZ || grid.z > kMaxGridYZ || grid.x > 0x7fffffffu) {
    throw std::invalid_argument("cuda_emulation: grid " + describe(grid) + " over the CUDA limits");
  }
}

// Runs every runnable fiber of the block until it exits or waits; returns
// once all have exited.
void run_block(Emulator& e, dim3 grid, dim3 block, dim3 block_idx) {
  const size_t threads = size_t{block.x} * block.y * block.z;
  for (size_t t = 0; t < threads; ++t) {
    Fiber& f = e.fibers[t];
    f.state = FiberState::kRunnable;
    f.coordinates.thread_idx = dim3(static_cast<unsigned>(t % block.x), static_cast<unsigned>(t / block.x % block.y),
                                    static_cast<unsigned>(t / (uint64_t{block.x} * block.y)));
    f.coordinates.block_idx = block_idx;
    f.coordinates.block_dim = block;
    f.coordinates.grid_dim = grid;
    if (!f.started) {
      getcontext(&f.start_context);
      f.start_context.uc_stack.ss_sp = e.stacks[t].get();
      f.start_context.uc_stack.ss_size = kStackBytes;
      f.start_context.uc_link = nullptr;
      makecontext(&f.start_context, fiber_entry, 0);
    }
  }
  while (true) {
    for (size_t k = 0; k < threads; ++k) {
      Fiber& f = e.fibers[e.order == Order::kForward ? k : threads - 1 - k];
      if (f.state != FiberState::kRunnable) {
        continue;
      }
      resume(e, f);
    }
    const Fiber* first_waiting = nullptr;
    for (size_t t = 0; t < threads; ++t) {
      Fiber& f = e.fibers[t];
      if (f.state != FiberState::kAtBarrier) {
        continue;
      }
      if (first_waiting == nullptr) {
        first_waiting = &f;
      } else if (f.barrier_line != first_waiting->barrier_line ||
                 std::string(f.barrier_file) != first_waiting->barrier_file) {
        throw std::logic_error("cuda_emulation: threads of block " + describe(block_idx) +
                               " wait at different __syncthreads (" + first_waiting->barrier_file + ":" +
                               std::to_string(first_waiting->barrier_line) + " and " + f.barrier_file + ":" +
                               std::to_string(f.barrier_line) + ")");
      }
      f.state = FiberState::kRunnable;
    }
    if (first_waiting == nullptr) {
      return;
    }
    ++e.counters.barriers;
  }
}

}  // namespace

const Coordinates& current() {
  Emulator& e = emulator();
  if (e.running == nullptr) {
    throw std::logic_error("cuda_emulation: threadIdx / blockIdx read outside a kernel");
  }
  return e.running->coordinates;
}

void sync_threads(const char* file, int line) {
  Emulator& e = emulator();
  Fiber* f = e.running;
  f->state = FiberState::kAtBarrier;
  f->barrier_file = file;
  f->barrier_line = line;
  yield_to_scheduler(e, *f);
}

void launch(dim3 grid, dim3 block, const std::function<void()>& kernel) {
  check_configuration(grid, block);
  Emulator& e = emulator();
  if (e.kernel != nullptr) {
    throw std::logic_error("cuda_emulation: a kernel launched from inside a kernel");
  }
  const size_t threads = size_t{block.x} * block.y * block.z;
  while (e.stacks.size() < threads) {
    e.stacks.emplace_back(new char[kStackBytes]);  // left uninitialised: untouched pages cost nothing
  }
  // Fibers persist: a new one only for a thread index not seen before.
  if (e.fibers.size() < threads) {
    e.fibers.resize(threads);
  }
  e.kernel = &kernel;
  ++e.counters.launches;
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  try {
    for (uint64_t k = 0; k < blocks; ++k) {
      const uint64_t b = e.order == Order::kForward ? k : blocks - 1 - k;
      const dim3 block_idx(static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                           static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y)));
      run_block(e, grid, block, block_idx);
      ++e.counters.blocks;
    }
  } catch (...) {
    // Fibers stopped inside the failed kernel are abandoned: start afresh.
    e.fibers.clear();
    e.kernel = nullptr;
    throw;
  }
  e.kernel = nullptr;
}

void set_order(Order order) { emulator().order = order; }
Counters counters() { return emulator().counters; }
void reset_counters() { emulator().counters = Counters{}; }

}  // namespace torchopt_ext::cuda_emulation
