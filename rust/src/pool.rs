//! The threads the CPU attention kernels run their tasks on.
//!
//! Where the process has an OpenMP runtime loaded (torch's operators run on one: libgomp on
//! Linux), a call's tasks run on the calling thread's OpenMP team, the threads torch's operators
//! use, through `GOMP_parallel` (which LLVM's and Intel's runtimes export too); else on rayon's
//! pool. Two pools on the same cores fight: after each parallel region an OpenMP worker spins for
//! a while waiting for the next (libgomp: 300,000 rounds, milliseconds), so a kernel called on
//! rayon's threads right after a torch operator shares a core with a spinning thread for that long.
//! On the one team, the spinning worker takes the kernel's next task instead.
//!
//! The thread count is then OpenMP's (`torch.set_num_threads`), else rayon's (`RAYON_NUM_THREADS`,
//! else one per logical CPU). Tasks are handed out one at a time to whichever thread is free, and
//! their results come back in task order, so a call gives the same numbers on either pool.

use std::any::Any;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;

/// Which pool [`map`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// The calling thread's OpenMP team.
    OpenMp,
    /// rayon's global pool.
    Rayon,
}

impl Pool {
    pub fn name(self) -> &'static str {
        match self {
            Pool::OpenMp => "openmp",
            Pool::Rayon => "rayon",
        }
    }
}

/// rayon even where an OpenMP runtime is loaded (for comparisons and tests).
static RAYON_ONLY: AtomicBool = AtomicBool::new(false);

/// Use rayon's pool only (`true`), or OpenMP's team where a runtime is loaded (`false`, the default).
pub fn set_rayon_only(on: bool) {
    RAYON_ONLY.store(on, Ordering::Relaxed);
}

/// `GOMP_parallel(fn, data, num_threads, flags)`: `fn(data)` on every thread of a team of
/// `num_threads` (0: the calling thread's default), the calling thread one of them; returns when
/// all have.
type Parallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, u32, u32);
/// `omp_get_max_threads()`: the team size a parallel region of the calling thread gets.
type MaxThreads = unsafe extern "C" fn() -> i32;

#[derive(Clone, Copy)]
struct OpenMp {
    parallel: Parallel,
    max_threads: MaxThreads,
}

/// The loaded OpenMP runtime's entry points, looked up among the symbols every loaded library
/// exports (torch loads its runtime that way); None where there is none.
#[cfg(target_os = "linux")]
fn openmp() -> Option<OpenMp> {
    use std::ffi::c_char;
    extern "C" {
        fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    }
    const RTLD_DEFAULT: *mut c_void = std::ptr::null_mut();
    // SAFETY: dlsym with NUL-terminated names; a found symbol is the runtime's function of the
    // documented signature.
    unsafe {
        let parallel = dlsym(RTLD_DEFAULT, c"GOMP_parallel".as_ptr());
        let max_threads = dlsym(RTLD_DEFAULT, c"omp_get_max_threads".as_ptr());
        if parallel.is_null() || max_threads.is_null() {
            return None;
        }
        Some(OpenMp {
            parallel: std::mem::transmute::<*mut c_void, Parallel>(parallel),
            max_threads: std::mem::transmute::<*mut c_void, MaxThreads>(max_threads),
        })
    }
}

#[cfg(not(target_os = "linux"))]
fn openmp() -> Option<OpenMp> {
    None
}

fn chosen() -> Option<OpenMp> {
    if RAYON_ONLY.load(Ordering::Relaxed) {
        None
    } else {
        openmp()
    }
}

/// The pool [`map`] uses now.
pub fn pool() -> Pool {
    match chosen() {
        Some(_) => Pool::OpenMp,
        None => Pool::Rayon,
    }
}

/// The threads [`map`] runs tasks on now.
pub fn threads() -> usize {
    match chosen() {
        // SAFETY: the runtime's omp_get_max_threads takes nothing.
        Some(omp) => unsafe { (omp.max_threads)() }.max(1) as usize,
        None => rayon::current_num_threads().max(1),
    }
}

/// `f(0), .., f(n - 1)` on the pool's threads, in task order (a single task on the calling thread:
/// no pool is woken for it).
pub fn map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    if n <= 1 {
        return (0..n).map(f).collect();
    }
    match chosen() {
        Some(omp) => on_team(omp, n, &f),
        None => (0..n).into_par_iter().map(&f).collect(),
    }
}

/// One call's tasks, shared by the team's threads.
struct Job<'a, T> {
    f: &'a (dyn Fn(usize) -> T + Sync),
    next: AtomicUsize,
    out: Vec<Mutex<Option<T>>>,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

/// A team thread: take the next task until none is left (or one has panicked).
extern "C" fn worker<T: Send>(data: *mut c_void) {
    // SAFETY: `data` is the `Job<T>` that `on_team` lends for the duration of GOMP_parallel.
    let job = unsafe { &*(data as *const Job<T>) };
    let n = job.out.len();
    loop {
        let i = job.next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            return;
        }
        // a panic must not unwind into the runtime's C frames: kept, and raised after the team
        match catch_unwind(AssertUnwindSafe(|| (job.f)(i))) {
            Ok(v) => *job.out[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(v),
            Err(p) => {
                job.panic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(p);
                job.next.store(n, Ordering::Relaxed);
                return;
            }
        }
    }
}

fn on_team<T: Send>(omp: OpenMp, n: usize, f: &(dyn Fn(usize) -> T + Sync)) -> Vec<T> {
    let job = Job {
        f,
        next: AtomicUsize::new(0),
        out: (0..n).map(|_| Mutex::new(None)).collect(),
        panic: Mutex::new(None),
    };
    // SAFETY: GOMP_parallel returns only after every thread of the team has returned from
    // `worker`, so `job` outlives every use of the pointer.
    unsafe {
        (omp.parallel)(worker::<T>, &job as *const Job<T> as *mut c_void, 0, 0);
    }
    if let Some(p) = job.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
        std::panic::resume_unwind(p);
    }
    job.out
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every task ran")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_keeps_task_order_on_either_pool() {
        for rayon_only in [false, true] {
            set_rayon_only(rayon_only);
            let got = map(1000, |i| i * i);
            assert_eq!(got, (0..1000).map(|i| i * i).collect::<Vec<_>>());
            assert!(map(0, |i| i).is_empty());
            assert_eq!(map(1, |i| i + 7), vec![7]);
        }
        set_rayon_only(false);
    }
}
