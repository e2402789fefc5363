//! Plugin SDK (see issue 4).
