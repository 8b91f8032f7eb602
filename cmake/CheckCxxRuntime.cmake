# cmake -DMODULE=path -DREADELF=... -DOBJDUMP=... -DNM=... -P CheckCxxRuntime.cmake
# Fails the build when the extension module does not load libstdc++ dynamically (see
# ExaoneExtCxxRuntime.cmake for why).
if(NOT CMAKE_HOST_SYSTEM_NAME STREQUAL "Linux")
  return()
endif()
set(_dyn "")
if(READELF)
  execute_process(COMMAND "${READELF}" -d "${MODULE}" OUTPUT_VARIABLE _dyn ERROR_QUIET RESULT_VARIABLE _rc)
elseif(OBJDUMP)
  execute_process(COMMAND "${OBJDUMP}" -p "${MODULE}" OUTPUT_VARIABLE _dyn ERROR_QUIET RESULT_VARIABLE _rc)
else()
  message(STATUS "exaone_ext: readelf / objdump not found: C++ runtime check of ${MODULE} skipped")
  return()
endif()
if(NOT _rc EQUAL 0)
  message(STATUS "exaone_ext: could not read ${MODULE}'s dynamic section: C++ runtime check skipped")
  return()
endif()
if(NOT _dyn MATCHES "NEEDED[^\n]*libstdc\\+\\+\\.so")
  message(FATAL_ERROR
    "exaone_ext: ${MODULE} does not load libstdc++ dynamically (no NEEDED libstdc++.so): the C++ runtime "
    "was linked statically, and the module's error messages would lose their numbers or crash. Build "
    "without -static-libstdc++ (LDFLAGS) with a compiler that ships libstdc++.so.")
endif()
if(NM)
  # std::ostream::_M_insert<long>: defined here only when a static libstdc++ was pulled in
  execute_process(COMMAND "${NM}" --defined-only "${MODULE}" OUTPUT_VARIABLE _syms ERROR_QUIET RESULT_VARIABLE _rc)
  if(_rc EQUAL 0 AND _syms MATCHES "_ZNSo9_M_insertIlEERSoT_")
    message(FATAL_ERROR
      "exaone_ext: ${MODULE} defines libstdc++'s std::ostream::_M_insert<long> itself: part of the C++ "
      "runtime was linked statically. Build with a compiler whose libstdc++.so is at least as new as "
      "its headers.")
  endif()
endif()
