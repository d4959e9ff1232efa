//! Handing freed heap memory back to the system.
//!
//! A reload parses and compiles the whole policy directory; the parse trees are freed once the
//! compiled form is in force, but the C allocator keeps the pages for later. On a host where
//! the daemon sits idle between reloads, that is memory taken from the agents for nothing:
//! after each reload (and after start-up) the free pages of every arena are returned.

/// Returns the allocator's free pages to the system. Cheap when there is nothing to return.
pub fn release_free() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists; any argument is valid.
    unsafe {
        libc::malloc_trim(0);
    }
}
