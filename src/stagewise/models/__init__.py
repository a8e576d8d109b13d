"""Models: specs (aliases, paths, hub ids), backends and runtimes, exports, and the fastest exact-enough path per use."""
