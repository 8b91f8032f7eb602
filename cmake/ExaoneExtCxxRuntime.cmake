# The C++ runtime of the extension module must be the shared libstdc++ (and libgcc_s) that the
# process already has: torch loads it, and a second, static copy inside _C keeps its own locale and
# stream state, which that copy never set up. Formatting a number into an error message then fails
# (the message loses its numbers, or the process dies in std::ostream). Some toolchains link the
# runtime statically: LDFLAGS=-static-libstdc++, or a compiler whose library folder holds only
# libstdc++.a. exaone_ext_cxx_runtime(target) removes static-runtime flags from the module's link,
# links the shared libstdc++ torch uses where the compiler has none, stops the configuration with
# what to do where neither works, and adds a post-build check that the module needs libstdc++.so.
include(CheckLinkerFlag)

set(_exaone_static_runtime_re "(^| )(-static-libstdc\\+\\+|-static-libgcc|-static)( |$)")

function(exaone_ext_cxx_runtime target)
  # 1. flags that would link the runtime statically (CMake seeds CMAKE_*_LINKER_FLAGS from LDFLAGS)
  foreach(var CMAKE_MODULE_LINKER_FLAGS CMAKE_SHARED_LINKER_FLAGS CMAKE_EXE_LINKER_FLAGS
              CMAKE_MODULE_LINKER_FLAGS_RELEASE CMAKE_SHARED_LINKER_FLAGS_RELEASE)
    set(_value " ${${var}} ")
    if(_value MATCHES "${_exaone_static_runtime_re}")
      message(WARNING "exaone_ext: ${var} ('${${var}}') would link the C++ runtime statically into the "
                      "extension module, beside the shared one torch loads; the static flags are dropped "
                      "for this module. Build without -static-libstdc++ / -static-libgcc in LDFLAGS.")
      while(_value MATCHES "${_exaone_static_runtime_re}")
        string(REGEX REPLACE "${_exaone_static_runtime_re}" " " _value "${_value}")
      endwhile()
      string(STRIP "${_value}" _value)
      set(${var} "${_value}" PARENT_SCOPE)
    endif()
  endforeach()
  foreach(prop LINK_OPTIONS INTERFACE_LINK_OPTIONS)
    get_target_property(_opts ${target} ${prop})
    if(_opts AND "${_opts}" MATCHES "-static-lib(stdc\\+\\+|gcc)")
      message(FATAL_ERROR "exaone_ext: target ${target} has ${prop} '${_opts}' that link the C++ runtime "
                          "statically; remove them.")
    endif()
  endforeach()

  # 2. does the compiler have a shared libstdc++ to link against? (GCC answers the bare name when not)
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    return()
  endif()
  execute_process(COMMAND "${CMAKE_CXX_COMPILER}" -print-file-name=libstdc++.so
                  OUTPUT_VARIABLE _so OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _rc)
  if(_rc EQUAL 0 AND IS_ABSOLUTE "${_so}" AND EXISTS "${_so}")
    message(STATUS "exaone_ext: C++ runtime: shared, ${_so}")
    return()
  endif()

  # 3. no shared libstdc++ beside the compiler: link the one torch itself loads
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import torch\nfor line in open('/proc/self/maps'):\n    path = line.split()[-1]\n    if '/libstdc++.so' in path:\n        print(path)\n        break"
    OUTPUT_VARIABLE _torch_so OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(NOT _torch_so OR NOT EXISTS "${_torch_so}")
    message(FATAL_ERROR
      "exaone_ext: the C++ compiler ${CMAKE_CXX_COMPILER} has no shared libstdc++ "
      "(-print-file-name=libstdc++.so gives '${_so}'), so the extension would carry a static copy beside "
      "the shared one torch loads, and its error messages would lose their numbers or crash. No "
      "libstdc++.so was found in a process that imports torch either. Build with a compiler that ships "
      "libstdc++.so (e.g. CXX=/usr/bin/g++), or point LIBRARY_PATH at a folder holding libstdc++.so.")
  endif()
  # Keep the compiler from adding its libstdc++.a: -nostdlib++ where the driver has it (GCC 13+, clang),
  # else -nodefaultlibs with the C libraries named again (libgcc_s shared: one unwinder in the process).
  check_linker_flag(CXX "-nostdlib++" _exaone_has_nostdlibxx)
  if(_exaone_has_nostdlibxx)
    target_link_options(${target} PRIVATE "-nostdlib++")
    target_link_libraries(${target} PRIVATE "${_torch_so}")
  else()
    target_link_options(${target} PRIVATE "-nodefaultlibs")
    target_link_libraries(${target} PRIVATE "${_torch_so}" -lm -lc -lgcc_s -lgcc)
  endif()
  message(STATUS "exaone_ext: C++ runtime: the compiler has no libstdc++.so; linking torch's ${_torch_so}")
endfunction()

# Post-build: the module must name libstdc++ among its NEEDED libraries and must not define the
# stream insertion that a static copy brings in. Skipped cleanly where binutils are missing.
function(exaone_ext_check_cxx_runtime target)
  find_program(EXAONE_READELF NAMES readelf llvm-readelf)
  find_program(EXAONE_OBJDUMP NAMES objdump llvm-objdump)
  find_program(EXAONE_NM NAMES nm llvm-nm)
  add_custom_command(TARGET ${target} POST_BUILD
    COMMAND "${CMAKE_COMMAND}" "-DMODULE=$<TARGET_FILE:${target}>" "-DREADELF=${EXAONE_READELF}"
            "-DOBJDUMP=${EXAONE_OBJDUMP}" "-DNM=${EXAONE_NM}"
            -P "${CMAKE_CURRENT_FUNCTION_LIST_DIR}/CheckCxxRuntime.cmake"
    VERBATIM)
endfunction()
