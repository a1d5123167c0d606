//! aoai-lb library.
