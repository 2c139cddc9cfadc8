//! The daemon's one policy for poisoned locks.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `m`, recovering from poisoning: a panic in one management operation (caught and
/// answered as an internal error) must not make every later one panic too. The state
/// behind these locks is left consistent by the operations' own ordering (checks first,
/// then one durable change), which is what poisoning would otherwise guard.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads through `l`, recovering from poisoning, as [`lock`].
pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

/// Writes through `l`, recovering from poisoning, as [`lock`].
pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}
