/* Lua 5.4 for Swift: the API's function-like macros as inline functions, plus the
 * pieces that must stay in C because they longjmp (lua_error) or run inside Lua's
 * allocator and hooks. Swift code never lets a Lua error unwind through Swift frames:
 * Swift C functions return MOONLET_LUA_RAISE with the message on the stack and the
 * C trampoline below raises it. */
#ifndef MOONLET_CLUA_SHIM_H
#define MOONLET_CLUA_SHIM_H
#include <lua.h>
#include <lualib.h>
#include <lauxlib.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <stdint.h>

#define MOONLET_LUA_RAISE (-1)
/* Returned by an API function (ml_pushapifunction) to yield the running coroutine. */
#define MOONLET_LUA_YIELD (-2)

static inline int ml_pcall(lua_State *L, int nargs, int nresults, int msgh) { return lua_pcall(L, nargs, nresults, msgh); }
static inline const char *ml_tostring(lua_State *L, int idx) { return lua_tolstring(L, idx, NULL); }
static inline void ml_pop(lua_State *L, int n) { lua_settop(L, -(n)-1); }
static inline void ml_newtable(lua_State *L) { lua_createtable(L, 0, 0); }
static inline int ml_isnil(lua_State *L, int idx) { return lua_type(L, idx) == LUA_TNIL; }
static inline int ml_isnoneornil(lua_State *L, int idx) { return lua_type(L, idx) <= 0; }
static inline int ml_isfunction(lua_State *L, int idx) { return lua_type(L, idx) == LUA_TFUNCTION; }
static inline int ml_istable(lua_State *L, int idx) { return lua_type(L, idx) == LUA_TTABLE; }
static inline void ml_pushcfunction(lua_State *L, lua_CFunction f) { lua_pushcclosure(L, f, 0); }
static inline int ml_upvalueindex(int i) { return LUA_REGISTRYINDEX - i; }
static inline int ml_registryindex(void) { return LUA_REGISTRYINDEX; }
static inline void *ml_newuserdata(lua_State *L, size_t sz) { return lua_newuserdatauv(L, sz, 1); }
static inline lua_Integer ml_tointeger(lua_State *L, int idx) { return lua_tointegerx(L, idx, NULL); }
static inline lua_Number ml_tonumber(lua_State *L, int idx) { return lua_tonumberx(L, idx, NULL); }
static inline void ml_getregistry_ref(lua_State *L, int ref) { lua_rawgeti(L, LUA_REGISTRYINDEX, ref); }
static inline int ml_ref(lua_State *L) { return luaL_ref(L, LUA_REGISTRYINDEX); }
static inline void ml_unref(lua_State *L, int ref) { luaL_unref(L, LUA_REGISTRYINDEX, ref); }
static inline void ml_pushglobaltable(lua_State *L) { lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS); }

/* ---- Limits: memory cap through the allocator, instruction and wall-clock budget through a hook ---- */

typedef struct ml_limits {
    size_t used;          /* bytes allocated by this VM */
    size_t cap;           /* 0 = unlimited */
    int over;             /* set when an allocation was refused */
    struct timespec deadline; /* wall-clock budget of the running call; tv_sec 0 = none */
    long long instr_left; /* instruction budget of the running call (in units of ML_HOOK_COUNT) */
    int aborted;          /* 1 = instruction budget, 2 = wall clock, 3 = memory cap */
    int host;             /* 1 while host (Swift) code allocates: the cap does not apply */
} ml_limits;

#define ML_HOOK_COUNT 1000

/* The allocator's hard limit: the soft cap (enforced from the hook, after a full
 * collection) plus room for what one call allocates between two hook checks. */
static inline size_t ml_hard_limit(const ml_limits *lim) { return lim->cap + lim->cap / 4 + (1u << 20); }

/* Plugin code allocates up to the hard limit; host code (lim->host: outside phase
 * calls and inside the Swift API functions) is never refused, so an allocation failure
 * can never raise a Lua error outside a protected call (a panic, which aborts the
 * process) or longjmp through Swift frames. Host allocations are bounded by what the
 * host pushes; a Swift API function that leaves the VM over the hard limit fails with
 * "not enough memory" once it has returned (ml_host_call). */
static inline void *ml_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
    ml_limits *lim = (ml_limits *)ud;
    if (ptr == NULL) osize = 0;
    if (nsize == 0) {
        free(ptr);
        lim->used -= osize;
        return NULL;
    }
    if (lim->cap && !lim->host && nsize > osize && lim->used - osize + nsize > ml_hard_limit(lim)) {
        lim->over = 1;
        return NULL;
    }
    void *np = realloc(ptr, nsize);
    if (np) lim->used = lim->used - osize + nsize;
    return np;
}

/* A Lua error outside every protected call. Host allocations cannot fail, so none
 * is expected; Lua aborts the process after this returns (leaving would need a C
 * setjmp point around every host section), so at least the message is kept. */
static inline int ml_panic(lua_State *L) {
    const char *m = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "(error object is not a string)";
    fprintf(stderr, "moonlet: Lua error outside a protected call: %s\n", m);
    fflush(stderr);
    return 0;
}

static inline lua_State *ml_newstate(ml_limits *lim) {
    lua_State *L = lua_newstate(ml_alloc, lim);
    if (L) lua_atpanic(L, ml_panic);
    return L;
}

static inline ml_limits *ml_limits_of(lua_State *L) {
    void *ud = NULL;
    lua_getallocf(L, &ud);
    return (ml_limits *)ud;
}

/* Runs Swift API function f in host mode (its allocations cannot fail, so no Lua error
 * ever unwinds its frames). Returns f's result, or -1 with "not enough memory" on top
 * when plugin code called it and it left the VM over the hard limit. */
static inline int ml_host_call(lua_State *L, lua_CFunction f) {
    ml_limits *lim = ml_limits_of(L);
    int was = lim->host;
    lim->host = 1;
    int r = f(L);
    if (!was && lim->cap && lim->used > ml_hard_limit(lim)) {
        lua_pushliteral(L, "not enough memory");
        r = -1;
    }
    lim->host = was;
    return r;
}

/* Calls the Swift function stored as light userdata in upvalue 1. A negative return
 * raises the value on top of the stack as a Lua error, from C. */
static inline int ml_trampoline(lua_State *L) {
    lua_CFunction f = (lua_CFunction)lua_touserdata(L, lua_upvalueindex(1));
    int r = ml_host_call(L, f);
    if (r < 0) return lua_error(L);
    return r;
}
static inline void ml_pushswiftfunction(lua_State *L, lua_CFunction f) {
    lua_pushlightuserdata(L, (void *)f);
    lua_pushcclosure(L, ml_trampoline, 1);
}

/* Whether the running call's wall-clock budget is spent (no deadline: never). */
static inline int ml_past_deadline(const ml_limits *lim) {
    if (lim->deadline.tv_sec == 0) return 0;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return now.tv_sec > lim->deadline.tv_sec ||
           (now.tv_sec == lim->deadline.tv_sec && now.tv_nsec > lim->deadline.tv_nsec);
}

static inline void ml_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    ml_limits *lim = ml_limits_of(L);
    /* Budget first: a VM kept over its memory cap must not stop the clock. */
    if (--lim->instr_left < 0) {
        lim->aborted = 1;
        luaL_error(L, "instruction budget exceeded (runaway code aborted)");
        return;
    }
    if (ml_past_deadline(lim)) {
        lim->aborted = 2;
        luaL_error(L, "wall-clock budget exceeded");
        return;
    }
    if (lim->cap && lim->used > lim->cap) {
        lua_gc(L, LUA_GCCOLLECT);
        if (lim->used > lim->cap) {
            lim->aborted = 3;
            luaL_error(L, "memory cap of %d bytes exceeded", (int)lim->cap);
        }
    }
}

static inline void ml_sethook(lua_State *L) { lua_sethook(L, ml_hook, LUA_MASKCOUNT, ML_HOOK_COUNT); }

/* Arms the budget for one call: instructions (rounded to ML_HOOK_COUNT) and milliseconds. */
static inline void ml_arm(ml_limits *lim, long long instructions, long ms) {
    lim->instr_left = instructions / ML_HOOK_COUNT;
    lim->aborted = 0;
    if (ms > 0) {
        clock_gettime(CLOCK_MONOTONIC, &lim->deadline);
        lim->deadline.tv_sec += ms / 1000;
        lim->deadline.tv_nsec += (ms % 1000) * 1000000L;
        if (lim->deadline.tv_nsec >= 1000000000L) { lim->deadline.tv_sec += 1; lim->deadline.tv_nsec -= 1000000000L; }
    } else {
        lim->deadline.tv_sec = 0;
    }
}

/* Compiling is C work outside the hook (and quadratic for some inputs, e.g. a long
 * chain of `or`): the source is handed to the parser in pieces of ML_LOAD_PIECE bytes,
 * each charged one hook unit, with the deadline checked; past the budget the compile
 * fails with the budget error. */
#define ML_LOAD_PIECE 1024
typedef struct ml_piece_reader { const char *p; size_t left; } ml_piece_reader;
static inline const char *ml_read_piece(lua_State *L, void *ud, size_t *size) {
    ml_piece_reader *r = (ml_piece_reader *)ud;
    ml_limits *lim = ml_limits_of(L);
    if (r->left == 0) { *size = 0; return NULL; }
    if (--lim->instr_left < 0) { lim->aborted = 1; luaL_error(L, "instruction budget exceeded in load (runaway code aborted)"); }
    if (ml_past_deadline(lim)) { lim->aborted = 2; luaL_error(L, "wall-clock budget exceeded in load"); }
    const char *p = r->p;
    *size = r->left < ML_LOAD_PIECE ? r->left : ML_LOAD_PIECE;
    r->p += *size;
    r->left -= *size;
    return p;
}

/* Loads text only (mode "t"): precompiled bytecode is refused. Charged to the armed
 * budget (see ml_read_piece). */
static inline int ml_loadtext(lua_State *L, const char *buf, size_t len, const char *chunkname) {
    ml_piece_reader r = { buf, len };
    return lua_load(L, ml_read_piece, &r, chunkname, "t");
}

/* Plugin code run or compiled from host code (require, a protected tostring): in guest
 * mode, so the memory cap applies to it. */
static inline int ml_guest_pcall(lua_State *L, int nargs, int nresults) {
    ml_limits *lim = ml_limits_of(L);
    int was = lim->host;
    lim->host = 0;
    int r = lua_pcall(L, nargs, nresults, 0);
    lim->host = was;
    return r;
}
static inline int ml_guest_loadtext(lua_State *L, const char *buf, size_t len, const char *chunkname) {
    ml_limits *lim = ml_limits_of(L);
    int was = lim->host;
    lim->host = 0;
    int r = ml_loadtext(L, buf, len, chunkname);
    lim->host = was;
    return r;
}

/* A traceback message handler for pcall. */
static inline int ml_msgh(lua_State *L) {
    const char *msg = lua_tostring(L, 1);
    if (msg == NULL) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) return 1;
        msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    }
    lua_pushstring(L, msg);
    return 1;
}

#endif

/* Extra space of a state (and every thread it creates): the owning VM's pointer. */
static inline void *ml_getvm(lua_State *L) { return *(void **)lua_getextraspace(L); }
static inline void ml_setvm(lua_State *L, void *vm) { *(void **)lua_getextraspace(L) = vm; }

/* Calls f(L) and, on a negative result, raises the message on top with the Lua
 * position of the caller prepended. Used by ml_trampoline2 for API functions. */
static inline int ml_trampoline_where(lua_State *L) {
    lua_CFunction f = (lua_CFunction)lua_touserdata(L, lua_upvalueindex(1));
    int r = ml_host_call(L, f);
    if (r < 0) {
        /* MOONLET_LUA_YIELD: the function suspends the running coroutine (moonlet.http.call);
         * the values given to the next resume become its results. */
        if (r == MOONLET_LUA_YIELD) return lua_yield(L, 0);
        luaL_where(L, 1);
        lua_insert(L, -2);
        lua_concat(L, 2);
        return lua_error(L);
    }
    return r;
}
static inline void ml_pushapifunction(lua_State *L, lua_CFunction f) {
    lua_pushlightuserdata(L, (void *)f);
    lua_pushcclosure(L, ml_trampoline_where, 1);
}
static inline int ml_resume(lua_State *co, lua_State *from, int nargs, int *nres) { return lua_resume(co, from, nargs, nres); }
static inline int ml_resetthread(lua_State *co) { return lua_resetthread(co); }
static inline void ml_pushlight(lua_State *L, uintptr_t v) { lua_pushlightuserdata(L, (void *)v); }
static inline uintptr_t ml_tolight(lua_State *L, int idx) { return (uintptr_t)lua_touserdata(L, idx); }
static inline int ml_islight(lua_State *L, int idx) { return lua_type(L, idx) == LUA_TLIGHTUSERDATA; }
/* Soft memory cap, checked from the count hook (C frame) so the error never unwinds Swift. */
static inline int ml_over_soft(lua_State *L) {
    void *ud = NULL; lua_getallocf(L, &ud);
    ml_limits *lim = (ml_limits *)ud;
    return lim->cap && lim->used > lim->cap;
}
static inline void ml_insert(lua_State *L, int idx) { lua_rotate(L, idx, 1); }
static inline void ml_gc_collect(lua_State *L) { lua_gc(L, LUA_GCCOLLECT, 0); }
static inline void ml_gc_generational(lua_State *L) { lua_gc(L, LUA_GCGEN, 0, 0); }
static inline void ml_pushbytes(lua_State *L, const void *p, size_t n) { lua_pushlstring(L, n ? (const char *)p : "", n); }
/* Arms the budget like ml_arm and returns the monotonic time it read, in ns (one
 * clock read serves both the deadline and the per-call timing). */
static inline uint64_t ml_arm_now(ml_limits *lim, long long instructions, long ms) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    lim->instr_left = instructions / ML_HOOK_COUNT;
    lim->aborted = 0;
    if (ms > 0) {
        lim->deadline.tv_sec = now.tv_sec + ms / 1000;
        lim->deadline.tv_nsec = now.tv_nsec + (ms % 1000) * 1000000L;
        if (lim->deadline.tv_nsec >= 1000000000L) { lim->deadline.tv_sec += 1; lim->deadline.tv_nsec -= 1000000000L; }
    } else {
        lim->deadline.tv_sec = 0;
    }
    return (uint64_t)now.tv_sec * 1000000000ull + (uint64_t)now.tv_nsec;
}
