//! aoai-sim library.
