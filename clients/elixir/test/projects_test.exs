defmodule SseGateway.ProjectsTest do
  # Uses the application's config (url), so not async.
  use ExUnit.Case, async: false

  alias SseGateway.Projects
  alias SseGateway.TestSupport.{FaultProxy, Gateway, Helpers}

  @uuid "3F1C2B4A-1111-4222-8333-444455556666"
  @lower "3f1c2b4a-1111-4222-8333-444455556666"
  @other "9b2e7c1d-2222-4333-8444-555566667777"

  # Atoms the subscriber code "knows", as an app's handle_info clauses would.
  @known [:project_created, :project_updated, :task_created, :assignment_added, :dependency_added]

  setup context do
    gw = start_supervised!({Gateway, Map.get(context, :gateway, [])})
    url = Gateway.url(gw)
    old = Application.get_all_env(:sse_gateway)
    Application.put_env(:sse_gateway, :url, url)
    Application.put_env(:sse_gateway, :mode, :sync)
    Application.put_env(:sse_gateway, :reconnect_max, 300)

    on_exit(fn ->
      for {k, _} <- Application.get_all_env(:sse_gateway),
          do: Application.delete_env(:sse_gateway, k)

      for {k, v} <- old, do: Application.put_env(:sse_gateway, k, v)
    end)

    %{gw: gw, url: url}
  end

  test "topic names are the module's" do
    assert Projects.topic_all() == "projects:all"
    assert Projects.topic_tasks() == "projects:tasks"
    assert Projects.topic_templates() == "projects:templates"
    assert Projects.topic_project(@uuid) == "projects:project:" <> @lower
    assert Projects.topic_project("{#{@uuid}}") == "projects:project:" <> @lower
  end

  test "each broadcast_* lands on the module's topics", %{url: url} do
    assert {:ok, id1} = Projects.broadcast_project(:project_created, %{uuid: @uuid, name: "Roof"})

    assert {:ok, _} =
             Projects.broadcast_project(:project_updated, %{
               "uuid" => @other,
               "is_template" => true
             })

    assert {:ok, _} =
             Projects.broadcast_project(:project_updated, %{
               "uuid" => @other,
               "is_template" => "true"
             })

    assert {:ok, _} =
             Projects.broadcast_task(:task_created, %{"uuid" => @other, "title" => "Nail"})

    assert {:ok, _} = Projects.broadcast_assignment(:assignment_added, %{"project_uuid" => @uuid})

    assert {:ok, _} =
             Projects.broadcast_dependency(:dependency_added, %{"project_uuid" => @other})

    assert id1 =~ ~r/\A[A-Za-z0-9]+-[0-9]+\z/

    assert Helpers.counts(url) == %{
             "projects:all" => 6,
             "projects:project:#{@lower}" => 2,
             "projects:project:#{@other}" => 3,
             "projects:templates" => 1,
             "projects:tasks" => 1
           }

    [e] = Helpers.raw_events(url, "/topics/projects:templates?last_event_id=0", 1)
    assert e.event == "project_updated"
    assert SseGateway.JSON.decode!(e.data) == %{"uuid" => @other, "is_template" => true}
  end

  test "errors carry the gateway's status, code and message; bad input is refused before sending" do
    assert {:error, %SseGateway.Error{status: 422, code: "invalid_payload", message: m}} =
             Projects.broadcast_assignment(:assignment_added, %{"project_uuid" => "nope"})

    assert m =~ "project_uuid"

    assert {:error, %SseGateway.Error{status: nil, code: "invalid_event"}} =
             Projects.broadcast_task(:reset, %{})

    assert {:error, %SseGateway.Error{status: nil, code: "invalid_topic"}} =
             SseGateway.publish("bad topic", :e, %{})

    assert {:error, %SseGateway.Error{status: 404, code: "not_found"}} =
             SseGateway.broadcast("projects", "nothing", :e, %{})
  end

  test "subscribe/1 delivers {:projects, event, payload} as the module does" do
    assert :ok = Projects.subscribe(Projects.topic_project(@uuid))
    assert :ok = Projects.subscribe(Projects.topic_project(@uuid)), "subscribing twice is a no-op"

    {:ok, _} = Projects.broadcast_project(:project_updated, %{uuid: @uuid, name: "Roof", n: 1.5})
    {:ok, _} = Projects.broadcast_project(:project_updated, %{uuid: @other})

    {:ok, _} =
      Projects.broadcast_assignment(:assignment_added, %{project_uuid: @uuid, user: "ana"})

    # A name made at run time, so no atom of it exists.
    fresh = "never_an_atom_#{System.unique_integer([:positive])}"
    {:ok, _} = Projects.broadcast_dependency(fresh, %{project_uuid: @uuid})

    assert_receive {:projects, :project_updated,
                    %{"uuid" => @uuid, "name" => "Roof", "n" => 1.5}},
                   2_000

    assert_receive {:projects, :assignment_added, %{"project_uuid" => @uuid, "user" => "ana"}},
                   2_000

    # Never an atom made from the network: an unknown event name stays a string.
    assert_receive {:projects, ^fresh, %{"project_uuid" => @uuid}}, 2_000
    refute_receive {:projects, _, _}, 300

    assert :ok = Projects.unsubscribe(Projects.topic_project(@uuid))
    {:ok, _} = Projects.broadcast_project(:project_updated, %{uuid: @uuid})
    refute_receive {:projects, _, _}, 500
  end

  @tag gateway: [retry_ms: 100]
  test "subscribe/1 survives kill -9 of the gateway: nothing missed, nothing repeated", %{gw: gw} do
    # The stream goes through a proxy that keeps it away while the restarted
    # gateway takes 20 more events: only Last-Event-ID brings those.
    proxy = start_supervised!({FaultProxy, Gateway.port(gw)})
    assert :ok = Projects.subscribe(Projects.topic_all(), url: FaultProxy.url(proxy))

    send_n = fn range ->
      for i <- range,
          do: {:ok, _} = Projects.broadcast_task(:task_created, %{"uuid" => @other, "i" => i})
    end

    send_n.(1..20)
    FaultProxy.set_mode(proxy, :refuse)
    Gateway.kill9(gw)
    Gateway.restart(gw)
    send_n.(21..40)
    FaultProxy.set_mode(proxy, :pass)
    send_n.(41..60)

    got = Helpers.collect(60, 10_000)

    assert Enum.map(got, fn {:projects, :task_created, %{"i" => i}} -> i end) ==
             Enum.to_list(1..60)

    refute_receive {:projects, _, _}, 500
  end

  @tag gateway: [retry_ms: 50, retention: [max_events_per_topic: 3, trim_interval_ms: 50]]
  test "a subscriber that was away longer than retention gets {:sse_gateway, :reset, info}", %{
    gw: gw
  } do
    proxy = start_supervised!({FaultProxy, Gateway.port(gw)})
    topic = Projects.topic_project(@uuid)
    assert :ok = Projects.subscribe(topic, url: FaultProxy.url(proxy))

    {:ok, _} = Projects.broadcast_project(:project_updated, %{uuid: @uuid, i: 0})
    assert_receive {:projects, :project_updated, %{"i" => 0}}, 2_000

    # The stream drops and cannot come back while 10 more are published and
    # all but the last 3 trimmed.
    FaultProxy.set_mode(proxy, :refuse)
    FaultProxy.cut(proxy)

    for i <- 1..10,
        do: {:ok, _} = Projects.broadcast_project(:project_updated, %{uuid: @uuid, i: i})

    Helpers.eventually(fn ->
      {:ok, 200, info, _} =
        SseGateway.HTTP.get("/topics/#{topic}/info", Helpers.cfg(Gateway.url(gw)))

      info["count"] == 3
    end)

    FaultProxy.set_mode(proxy, :pass)

    assert_receive {:sse_gateway, :reset,
                    %{reason: :retention, requested: requested, oldest: oldest, topics: [^topic]}},
                   5_000

    assert is_binary(requested) and is_binary(oldest)
    # Then what is still retained, in order, and nothing else.
    assert Enum.map(Helpers.collect(3, 5_000), fn {:projects, _, %{"i" => i}} -> i end) == [
             8,
             9,
             10
           ]

    refute_receive {_, _, _}, 300
  end

  test "a dropped stream resumes without loss or repeat (through a proxy that cuts it)", %{gw: gw} do
    proxy = start_supervised!({FaultProxy, Gateway.port(gw)})
    assert :ok = Projects.subscribe(Projects.topic_tasks(), url: FaultProxy.url(proxy))

    for i <- 1..30 do
      {:ok, _} = Projects.broadcast_task(:task_created, %{"i" => i})

      if rem(i, 7) == 0 do
        FaultProxy.cut(proxy)
        # Publish the next ones both while it is away and after it is back.
        if rem(i, 14) == 0, do: Process.sleep(300)
      end
    end

    got = Helpers.collect(30, 10_000)

    assert Enum.map(got, fn {:projects, :task_created, %{"i" => i}} -> i end) ==
             Enum.to_list(1..30)

    refute_receive {:projects, _, _}, 300
    assert FaultProxy.stats(proxy).connections >= 3
  end

  @tag gateway: [heartbeat_ms: 300, retry_ms: 50]
  test "a stream gone silent (keepalives stop) is replaced and resumes without a gap", %{gw: gw} do
    proxy = start_supervised!({FaultProxy, Gateway.port(gw)})

    assert :ok =
             Projects.subscribe(Projects.topic_tasks(),
               url: FaultProxy.url(proxy),
               idle_timeout: 1_000
             )

    {:ok, _} = Projects.broadcast_task(:task_created, %{"i" => 1})
    assert_receive {:projects, :task_created, %{"i" => 1}}, 2_000

    # The path goes dead without closing: these are lost on that connection.
    FaultProxy.set_mode(proxy, :blackhole)
    for i <- 2..5, do: {:ok, _} = Projects.broadcast_task(:task_created, %{"i" => i})
    Process.sleep(300)
    FaultProxy.set_mode(proxy, :pass)
    for i <- 6..7, do: {:ok, _} = Projects.broadcast_task(:task_created, %{"i" => i})

    # Silence past idle_timeout: a new connection, from the last id seen.
    got = Helpers.collect(6, 5_000)

    assert Enum.map(got, fn {:projects, :task_created, %{"i" => i}} -> i end) ==
             Enum.to_list(2..7)
  end

  test "known atoms exist" do
    assert Enum.all?(@known, &is_atom/1)
  end
end
