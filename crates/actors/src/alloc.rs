//! The process allocator's view of memory (glibc): bytes in use, bytes free but still
//! held, and a trim that returns free pages to the system. glibc keeps freed memory in
//! per-thread arenas; after a burst (a load's request buffers, a retrain's matrices) the
//! resident size stays far above what is live unless the arenas are trimmed.

use serde::Serialize;

/// Heap bytes by state, from `mallinfo2`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct AllocStats {
    /// Allocated and live (small chunks plus mmapped blocks).
    pub in_use: usize,
    /// Freed but held by the allocator.
    pub free_held: usize,
}

/// The allocator's counts (`None` on a platform without glibc).
pub fn stats() -> Option<AllocStats> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 has no preconditions; it only reads the allocator's counters.
        #[allow(unsafe_code)]
        let m = unsafe { libc::mallinfo2() };
        Some(AllocStats {
            in_use: m.uordblks + m.hblkhd,
            free_held: m.fordblks,
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// Caps glibc's arenas at one per core (its default is eight per core): every thread that
/// allocates gets an arena and keeps freed memory in it, so on a node whose tokio, rayon
/// and blocking threads all allocate, fewer arenas hold less memory that is free but
/// resident. Call before the runtime starts. A no-op without glibc.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
        // SAFETY: mallopt only sets a tuning parameter; an invalid value is refused.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, cores.min(64) as libc::c_int);
        }
    }
}

/// Returns free memory of every arena to the system (a no-op without glibc).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim has no preconditions; it releases only free pages.
        #[allow(unsafe_code)]
        unsafe {
            libc::malloc_trim(0);
        }
    }
}
