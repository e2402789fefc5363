//! Process-wide services the engine hands to every step through its context, looked up by type.
//!
//! The engine owns one of each (e.g. the plugin host: one wasmtime engine, epoch ticker and compilation
//! cache per process) and steps borrow it; this crate only carries them, so it need not know their types.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;

/// A set of shared services, at most one per type. Cheap to clone.
#[derive(Clone, Default)]
pub struct Services {
    by_type: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl Services {
    /// No services.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `service`, replacing one of the same type.
    pub fn insert<T: Any + Send + Sync>(&mut self, service: Arc<T>) -> &mut Self {
        self.by_type.insert(TypeId::of::<T>(), service);
        self
    }

    /// The service of type `T`, if one was added.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        self.by_type
            .get(&TypeId::of::<T>())
            .cloned()
            .and_then(|s| s.downcast::<T>().ok())
    }
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services")
            .field("count", &self.by_type.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_is_found_by_its_type_only() {
        let mut services = Services::new();
        services.insert(Arc::new(7u32));
        assert_eq!(services.get::<u32>().as_deref(), Some(&7));
        assert!(services.get::<u64>().is_none());
    }
}
