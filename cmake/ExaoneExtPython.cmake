# Python, pybind11 and the facts about the installed torch that the build depends on.
# Torch is found through the running interpreter, never through a hard-coded path.
find_package(Python REQUIRED COMPONENTS Interpreter Development.Module)

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import pybind11; print(pybind11.get_cmake_dir())"
  OUTPUT_VARIABLE _pybind11_dir OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "pybind11 is not installed for ${Python_EXECUTABLE}: pip install pybind11")
endif()
list(APPEND CMAKE_PREFIX_PATH "${_pybind11_dir}")
find_package(pybind11 CONFIG REQUIRED)

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import os, torch; print(torch.utils.cmake_prefix_path); print(torch.__version__); print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); print(torch.version.cuda or ''); print(os.path.dirname(os.path.dirname(torch.__file__)))"
  OUTPUT_VARIABLE _torch_facts OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "torch is not importable by ${Python_EXECUTABLE}. Install it first "
                      "(pip install torch==2.13.0) and build with --no-build-isolation.")
endif()
string(REPLACE "\n" ";" _torch_facts "${_torch_facts}")
list(GET _torch_facts 0 _torch_prefix)
list(GET _torch_facts 1 EXAONE_TORCH_VERSION)
list(GET _torch_facts 2 EXAONE_TORCH_CXX11_ABI)
list(LENGTH _torch_facts _n)
set(EXAONE_TORCH_CUDA_VERSION "")
if(_n GREATER 4)
  list(GET _torch_facts 3 EXAONE_TORCH_CUDA_VERSION)
  list(GET _torch_facts 4 EXAONE_SITE_PACKAGES)
else()
  list(GET _torch_facts 3 EXAONE_SITE_PACKAGES)
endif()
list(APPEND CMAKE_PREFIX_PATH "${_torch_prefix}")
# Always the torch of this interpreter, even in a build directory configured before with another one.
set(Torch_DIR "${_torch_prefix}/Torch" CACHE PATH "" FORCE)
set(Caffe2_DIR "${_torch_prefix}/Caffe2" CACHE PATH "" FORCE)
message(STATUS "exaone_ext: torch ${EXAONE_TORCH_VERSION} (CUDA '${EXAONE_TORCH_CUDA_VERSION}', cxx11 abi ${EXAONE_TORCH_CXX11_ABI})")
