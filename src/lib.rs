//! The end-to-end tests of the umem workspace live under `tests/`, on the kit of
//! `umem-testkit` (`testkit/`); this library is empty.
