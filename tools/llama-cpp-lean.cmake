# Included by CMake right after llama.cpp's project() call when the Makefile builds
# llama-cpp-python's wheel (CMAKE_PROJECT_llama.cpp_INCLUDE). llama-cpp-python forces llama.cpp's
# "common" library on (its CMakeLists sets LLAMA_BUILD_COMMON in the cache with FORCE), but its
# Python package loads only libllama and libggml: common, and the HTTP library it brings, are 53
# of the 127 files compiled, for nothing. A normal variable here hides the cached ON from
# llama.cpp's own CMakeLists (policy CMP0077), so neither is built.
set(LLAMA_BUILD_COMMON OFF)
