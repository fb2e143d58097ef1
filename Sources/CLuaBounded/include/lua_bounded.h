/* Bounded replacements for the Lua standard-library C functions a filter can reach,
 * and the sandbox's guards (read-only proxies, setmetatable without finalizers).
 * See bounded.c. */
#ifndef MOONLET_LUA_BOUNDED_H
#define MOONLET_LUA_BOUNDED_H
#include <lua.h>

/* Replaces, in the library tables of L's global table, string.find/match/gmatch/gsub/rep
 * and table.insert/remove/move/concat/sort with versions that charge the running call's
 * budget (instructions and wall clock) as they work, setmetatable/rawset in the
 * global table with the sandbox's guarded versions, and pcall, xpcall,
 * coroutine.resume/close with versions that re-raise an error once the budget is spent. Call once per VM, after
 * luaL_openlibs and before any proxy is made. */
void ml_open_bounded(lua_State *L);

/* Replaces the table on top of the stack with a read-only proxy of it: reads go
 * through, writes (assignment, rawset, setmetatable) raise "<name> is read-only",
 * getmetatable gives false, pairs iterates the real table without exposing it. */
void ml_push_readonly(lua_State *L, const char *name);

/* Pushes a C closure that calls Swift function f (trampoline with the Lua position on
 * errors, as ml_pushapifunction) with the nup values on top of the stack as upvalues
 * 2..nup+1 (upvalue 1 is f). */
void ml_pushapiclosure(lua_State *L, lua_CFunction f, int nup);

/* luaL_tolstring in a protected call (a __tostring that errs or returns no string
 * gives "(error in __tostring)"): for host code, which must not be unwound by a Lua
 * error. Pushes the string and returns it; returns NULL, with the error on top, when
 * the running call's budget is spent (the caller must raise it, as pcall would). */
const char *ml_tolstring_protected(lua_State *L, int idx, size_t *len);

/* Charges the running call's budget for `steps_over` (<= 0) steps past a tick chunk;
 * raises a Lua error naming `what` when the instruction or wall-clock budget is
 * spent. Returns the next chunk of steps. */
int ml_budget_charge(lua_State *L, int steps_over, const char *what);

#endif
